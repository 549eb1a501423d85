"""Published facts about the original MambaOut models, kept in one place.

Numbers from the paper ("MambaOut: Do We Really Need Mamba for Vision?", Yu & Wang, 2024) and from timm's
re-evaluation of the released weights (the project's reference, shared/reference/mambaout.md).
"""
from dataclasses import dataclass

# The GitHub release of the reference code is tagged "model" (as its README links it).
RELEASE_URL = 'https://github.com/yuweihao/MambaOut/releases/download/model/{file}'


@dataclass(frozen=True)
class Published:
    """What the paper and timm report for one released model (ImageNet-1k val, top-1 in %)."""

    name: str
    params: int
    gmacs: float  # at 224 x 224, as printed in the paper
    top1: float  # the paper, at 224
    timm_top1_224: float  # timm's re-evaluation of the released weights
    timm_top1_288: float

    @property
    def release_file(self) -> str:
        return f'{self.name}.pth'

    @property
    def release_url(self) -> str:
        return RELEASE_URL.format(file=self.release_file)

    @property
    def hub_id(self) -> str:
        return f'timm/{self.name}.in1k'


PUBLISHED: dict[str, Published] = {p.name: p for p in (
    Published('mambaout_femto', 7_304_536, 1.2, 78.9, 78.880, 79.912),
    Published('mambaout_kobe', 9_141_208, 1.5, 80.0, 79.986, 81.064),
    Published('mambaout_tiny', 26_545_096, 4.5, 82.7, 82.742, 83.452),
    Published('mambaout_small', 48_488_072, 9.0, 84.1, 84.094, 84.512),
    Published('mambaout_base', 84_813_092, 15.8, 84.2, 84.194, 84.730),
)}
