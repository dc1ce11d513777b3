"""What an image request is to the decode loop: the job a GenerateImage
request asks for (``ImageJob``), the counters it reports (``ImageStats``),
what each of its calls carries (``Request``), and its KV cache on the
backbone (``ImageKVSession``). ``arserve.verifier.image`` runs the loop;
``arserve.verifier.image_steps`` steps concurrent requests together."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..pb.v1 import backbone_pb2 as bpb
from ..settings import ImageModelSettings
from ..wire import to_proto
from .service import KVSession


@dataclass(frozen=True)
class ImageJob:
    """What one GenerateImage request asks of the loop (validated)."""

    labels: torch.Tensor  # [n] int64 class of each image
    temperature: float  # diffusion temperature (> 0)
    cfg: float  # classifier-free guidance scale (1 = off)
    steps: int  # denoising steps
    method: str  # "none" or "draft_model"
    num_draft_tokens: int  # k, drafts per round (the upper bound when adaptive)
    seed: int  # the request's random generator seed
    adaptive: bool = True  # k follows the request's running acceptance rate, down to 0 (plain rounds)
    # the per-token acceptance rate an adaptive request starts from (the model's measured one; the gateway passes it)
    prior_rate: float = ImageModelSettings.model_fields["draft_acceptance"].default
    # the adaptive draft length's cost model at 1 and at 32 images (the model's; the gateway passes it)
    round_costs: tuple[tuple[float, float, float], tuple[float, float, float]] = (
        ImageModelSettings.model_fields["round_costs_batch1"].default,
        ImageModelSettings.model_fields["round_costs_batch32"].default)

    @property
    def guided(self) -> bool:
        return self.cfg != 1.0


@dataclass
class ImageStats:
    """Counters of continuous speculative decoding, summed over rows."""

    drafted: int = 0  # draft tokens verified (usable ones: never past an image's end)
    accepted: int = 0  # draft tokens the acceptance rule kept
    rounds: int = 0  # verification rounds (one target forward each)
    row_rounds: int = 0  # rounds times the rows still generating in each
    residual_proposals: int = 0  # target trajectories drawn to sample recovered tokens
    residual_capped: int = 0  # recovered tokens that hit the try cap (then a plain target sample)
    recovered: int = 0  # tokens sampled from the residual (one per rejected round of a row)
    plain: int = 0  # tokens of plain rounds (no draft model, or the adaptive draft length fell to 0)
    draft_rate: float = 0.0  # the adaptive draft length's acceptance-rate estimate at the end

    @property
    def mean_accepted_length(self) -> float:
        """Tokens committed per row per round: (accepted + recovered + plain) / row_rounds."""
        return (self.accepted + self.recovered + self.plain) / self.row_rounds if self.row_rounds else 0.0


class ImageKVSession(KVSession):
    """The request's cache on the image backbone: resumes as text's does
    (``KVSession``), resending the committed tokens of every row."""

    @staticmethod
    def _resend(req: bpb.ScoreRequest, committed: torch.Tensor) -> None:
        req.image.context.CopyFrom(to_proto(committed))  # [rows, seq_len, token_dim]



@dataclass
class Request:
    """What every call of one request carries."""

    ids: dict  # request_id (run_id) and model
    job: ImageJob
    rows: torch.Tensor  # [rows] labels of the model rows
    capacity: int  # positions per row cache: seq_len + k
    generator: torch.Generator  # the request's randomness: every noise draw, acceptance and residual

    @property
    def kind(self) -> tuple:
        """What requests stepped together (``PlainSteps``, ``Rounds``) share: model, steps, temperature, guidance."""
        return self.ids["model"], self.job.steps, self.job.temperature, self.job.cfg
