"""GUI-free processing library. Never imports napari, qtpy or magicgui."""
