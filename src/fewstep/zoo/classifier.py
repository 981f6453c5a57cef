"""A small digits classifier whose penultimate features define the Fréchet distance (FD) metric."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["DigitsClassifier"]


class DigitsClassifier(torch.nn.Module):
    """MLP on the flattened 8x8 digit: 64 -> 256 -> 64 (features) -> 10 logits, SiLU activations."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 256), torch.nn.SiLU(),
                                        torch.nn.Linear(256, 64), torch.nn.SiLU())
        self.head = torch.nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.reshape(x.shape[0], 64).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / "model.safetensors"))

    @classmethod
    def load(cls, folder: Path) -> DigitsClassifier:
        from safetensors.torch import load_file

        model = cls()
        model.load_state_dict(load_file(str(Path(folder) / "model.safetensors")))
        return model.eval()
