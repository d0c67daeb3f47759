"""Kept only so that models logged before the rename still load: use :mod:`pipelines.image_model`.

A logged pyfunc model stores its ``python_model`` pickled by reference, and models logged
by versions up to 2026-12 name ``pipelines.serving.ImageModel``; unpickling them imports
this module. New code imports :mod:`pipelines.image_model`.
"""

from pipelines.image_model import ImageModel

__all__ = ["ImageModel"]
