"""The cnn handler, failing every other batch it is given: a loudly bad model version.

The rollouts e2e archives it as a new version of cnn: its canary answers half its requests with a
5xx, which the Rollout's error-rate analysis must catch at the first step. Nothing else serves it.
"""

from __future__ import annotations

from handlers.image_classifier import ImageClassifierHandler

FAIL_EVERY = 2  # one batch in FAIL_EVERY raises


class FailingImageClassifierHandler(ImageClassifierHandler):
    batches = 0

    def handle(self, data, context):
        self.batches += 1
        if self.batches % FAIL_EVERY == 0:
            raise RuntimeError("injected failure: a loudly bad model version")
        return super().handle(data, context)
