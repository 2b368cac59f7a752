"""Test and tool support (zoo skeletons with seeded random weights); never used by pruning."""
