"""The Minkowski-difference linear separability measures (docs/math.md)."""
