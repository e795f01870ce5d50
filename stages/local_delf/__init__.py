"""Stage 2: local features (keypoints + descriptors) for each query and its shortlisted references."""
