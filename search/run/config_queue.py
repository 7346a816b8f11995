"""ConfigQueue: a Tune searcher that hands out given configs in order, each once; the
confirm stage's (search/run/confirm.py). Tune's BasicVariantGenerator takes preset configs only
for keys its param space defines."""

from __future__ import annotations

import pickle
from typing import Any

from ray.tune.search import Searcher


class ConfigQueue(Searcher):
    def __init__(self, configs: list[dict[str, Any]]):
        super().__init__()
        self.configs = configs
        self.given = 0

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if self.given == len(self.configs):
            # a str: Ray types suggest as returning a dict, but documents FINISHED
            return Searcher.FINISHED  # type: ignore[return-value]
        self.given += 1
        return self.configs[self.given - 1]

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                          error: bool = False) -> None:
        pass

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))
