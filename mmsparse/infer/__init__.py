"""Captioning with a trained model: ``Captioner(model_dir).caption(paths_or_manifests)`` and the
``mmsparse caption`` command (``cli``). See ``captioner`` for the record format and the failure
behaviour."""

from .captioner import Captioner, ModelLoadError, Preprocess, load_model, load_preprocess, resolve_model_dir

__all__ = ["Captioner", "ModelLoadError", "Preprocess", "load_model", "load_preprocess", "resolve_model_dir"]
