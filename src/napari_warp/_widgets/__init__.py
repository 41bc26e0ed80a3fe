"""Thin Qt/magicgui views over napari_warp.core. Long work runs in thread_workers."""
