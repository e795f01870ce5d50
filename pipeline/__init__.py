"""The application: chains the stages (`run`), its command line (`cli`), evaluation, the demo
data set, the NSML hook and training. It imports the stages and the core (`stages.common`);
nothing below imports it."""
