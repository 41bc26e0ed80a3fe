"""napari-warp: Warp's cryo-EM pre-processing as a napari plugin with a torch core."""

__version__ = "0.1.0"
