"""The Minkowski-difference linear separability measures (DESIGN §2)."""
