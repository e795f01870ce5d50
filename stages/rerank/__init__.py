"""Stage 3: RANSAC geometric verification of the shortlist, merged into the global ranking."""
