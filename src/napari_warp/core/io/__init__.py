"""Reading and writing what microscopes and other programs write."""
