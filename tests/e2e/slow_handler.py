"""The cnn handler with a model load that takes LOAD_S seconds.

It stands in for a model whose weights take minutes to fetch and load (a large model on a GPU node):
the serverless e2e archives it as cnn, with a model config whose startupTimeout allows the load,
and checks that requests held while a pod loads it are answered. Nothing else serves it.
"""

from __future__ import annotations

import time

from handlers.image_classifier import ImageClassifierHandler

LOAD_S = 90  # above the 60 s after which an activator has been seen closing held connections


class SlowLoadingImageClassifierHandler(ImageClassifierHandler):
    def initialize(self, context) -> None:
        time.sleep(LOAD_S)
        super().initialize(context)
