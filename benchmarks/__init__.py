"""asv benchmark suite for selfattn (see README.md in this folder)."""
