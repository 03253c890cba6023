"""Datasets on disk: finding, checking, downloading and caching them as uint8 tensors."""
