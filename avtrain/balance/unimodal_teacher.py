"""Uni-Modal Teacher (UMT): distil each encoder towards a trained single-modality model.

Paper: C. Du, J. Teng, T. Li, Y. Liu, T. Yuan, Y. Wang, Y. Yuan, H. Zhao, "On Uni-modal Feature
Learning in Supervised Multi-modal Learning", ICML 2023 (earlier: "Improving Multi-Modal
Learning with Uni-Modal Teachers", arXiv 2106.11059). No code of the authors was found (the
GitHub index, issue threads and web pages were searched: the papers' pages link none, and the
first author's public repositories hold other projects), so the reference is BalanceMM's
re-implementation, GeWu-Lab/BalanceBenchmark (commit 4c1482f):

- balancemm/trainer/UMT_trainer.py: `__init__` lines 26-53 (`scaling` and the window 28-30; one
  teacher per modality of the student, built from the student's encoder config for that modality
  alone 40-43, loaded from the newest `unimodalTrainer_<modality>` run's checkpoint 44-48,
  wrapped in DataParallel 49-50 and never put in eval mode); `training_step` lines 129-147 (CE of
  the fused output 132/138; inside the window 139, per modality, the teacher's forward under
  `no_grad` 141-142 and `loss += scaling * MSELoss(teacher encoder_result[m], student
  encoder_result[m])` 143-144; one backward 146; the total is the step's loss 147);
- configs/trainer_config.yaml lines 62-66 (UMT: alpha 1 -- never read --, modulation_starts 0,
  modulation_ends 80, scaling 10);
- balancemm/models/avclassify_model.py `BaseClassifierModel.forward` lines 256-275 and
  `resnet_process` 214-232: `encoder_result[m]` is the encoder's pooled feature vector [B, D]
  (audio: 2-D average pool; visual: average over frames and space), the fusion's input;
- balancemm/utils/train_utils.py lines 35-48 and balancemm/trainer/base_trainer.py lines 269-271,
  395-397, 524-535: the one checkpoint of a run is saved after each epoch whose validation
  accuracy improved, i.e. the teacher is its run's best epoch.

No code is copied; tests/test_unimodal_teacher_released.py checks our steps against a reference
written from these semantics.

The step (hooks level: the loss only), inside the window [--modulation-start,
--modulation-end] (0 and 80):

    loss = CE(fused, y) + scaling * sum_m MSE(t_m, f_m)

f_m the student's encoder features from the training forward (forward hooks on the encoders:
the one forward of `ctx.net` under DDP), t_m = teacher_m.features(batch)[m] under `no_grad`,
MSE the mean over the B x D elements; the gradient reaches the student's encoders only.
Outside the window: CE alone and no teacher forward. The signal (`step_metrics`):
`distill_<modality>` (the unscaled MSE) and `ce`, averaged over the ranks (the global batch's
values); the logged loss is the total, as BalanceMM returns it.

Teachers: `--teacher MODALITY=RUN_DIR` for every modality of the model (repeatable; YAML: a list
of such strings or a mapping), each a finished `avtrain fit --modalities MODALITY` run
(summary.json and best.pt present); its best.pt is loaded with the eval code's loader
(`avtrain.checkpoint.load_checkpoint` and `model_from_checkpoint`) before training, so
a bad teacher is one `Error:` line: missing modality, run not found or not finished, another
modality, another encoder, number of classes or dataset, features of another size. Teachers are
frozen (no gradients, not in the optimizer, not in the student's checkpoint); `--resume`
reloads them from the paths in config.yaml, and the balancer's state holds a digest of each
teacher's weights, so resuming with a changed teacher is refused instead of silently different.

Options, where we differ, and why:

- `--unimodal-teacher-scaling` (10: trainer_config.yaml `scaling`);
- `--unimodal-teacher-mode train` (default, BalanceMM: its teachers are never put in eval mode,
  so their BatchNorm layers normalise with the batch's statistics -- each GPU's half of it under
  its DataParallel, each rank's share under our DDP -- and update running statistics nobody
  reads) or `eval` (running statistics: a teacher's features of a sample do not depend on the
  rest of the batch, which is what a frozen teacher means in the paper's description, and
  2-process DDP equals one process exactly);
- the teacher of a modality is the run the user names (BalanceMM: the newest run folder found
  by its naming scheme) and must use the student's encoder (BalanceMM builds it from the
  student's encoder config, so it always does);
- only the teacher's encoder runs (BalanceMM runs the whole teacher and reads its encoder
  output: the same features, without the unused head);
- any number of modalities and any fusion of an encoder + fusion model (BalanceMM's loop is
  over the student's modalities already); sequence models have no per-modality encoder
  features to distil: an error.

Nothing per step leaves the device: the MSEs are tensors, the window is host arithmetic on the
epoch.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from avprep.errors import UserError
from avtrain.options import Option, Search

from ..checkpoint import load_checkpoint, model_from_checkpoint, weights_digest
from ..models import encoder_name
from . import _dist
from ._checks import fused_model, require_two_modalities
from .base import Balancer, StepContext

MODES = ("train", "eval")


def teacher_runs(value) -> dict[str, str]:
    """{modality: run dir} from --teacher MODALITY=RUN_DIR strings (repeatable), or a mapping."""
    if not value:
        return {}
    if isinstance(value, dict):
        items = [(str(k), str(v)) for k, v in value.items()]
    else:
        items = []
        for item in [value] if isinstance(value, str) else value:
            modality, sep, run = str(item).partition("=")
            if not sep or not modality.strip() or not run.strip():
                raise UserError(f"--teacher expects MODALITY=RUN_DIR, got {item!r}")
            items.append((modality.strip(), run.strip()))
    out: dict[str, str] = {}
    for modality, run in items:
        if modality in out:
            raise UserError(f"--teacher {modality}=... is given twice; one teacher per modality")
        out[modality] = run
    return out


def distillation_losses(teacher: dict[str, torch.Tensor],
                        student: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{modality: MSE(teacher features, student features)}, each the mean over B x D
    (BalanceMM's nn.MSELoss()), in float32; the teacher side carries no gradient."""
    return {m: F.mse_loss(teacher[m].detach().float(), student[m].float()) for m in teacher}


def load_teacher(modality: str, run: str, student, *, dataset: str | None = None):
    """The frozen teacher model of `modality` from a finished run directory, checked against
    the student (bare model); raises UserError with one line naming the flag."""
    flag = f"--teacher {modality}={run}"
    if not os.path.isdir(run):
        raise UserError(f"{flag}: run directory not found")
    missing = [n for n in ("summary.json", "best.pt") if not os.path.isfile(os.path.join(run, n))]
    if missing:
        raise UserError(f"{flag} is not a finished run (no {' or '.join(missing)}); finish it "
                        f"with avtrain fit --resume {run}")
    ckpt = load_checkpoint(run)  # best.pt, as `avtrain eval --ckpt RUN` reads it
    spec = ckpt.get("spec") or {}
    mods = list(spec.get("modalities") or [])
    if mods != [modality]:
        raise UserError(f"{flag} is a run on {', '.join(mods) or 'no modality'}; a teacher is "
                        f"a single-modality run (avtrain fit --modalities {modality})")
    want = student.spec
    have_name, want_name = encoder_name(spec, modality), encoder_name(want, modality)
    if have_name != want_name:
        raise UserError(f"{flag} has {have_name} encoders; this run's are "
                        f"{want_name} (a teacher is the student's encoder trained alone)")
    if spec.get("num_classes") != want["num_classes"]:
        raise UserError(f"{flag} was trained for {spec.get('num_classes')} classes; this run "
                        f"has {want['num_classes']}")
    if dataset and ckpt.get("dataset") and ckpt["dataset"] != dataset:
        raise UserError(f"{flag} was trained on {ckpt['dataset']}; this run's shards are "
                        f"{dataset}")
    teacher = model_from_checkpoint(ckpt)
    encoder = getattr(teacher, "encoders", None)
    if encoder is None or modality not in encoder:
        raise UserError(f"{flag}: its model has no {modality} encoder")
    have, need = encoder[modality].out_dim, student.encoders[modality].out_dim
    if have != need:
        raise UserError(f"{flag} gives {have} features per clip; this run's {modality} encoder "
                        f"gives {need}")
    teacher.requires_grad_(False)
    return teacher


class UnimodalTeacher(Balancer):
    """CE of the fused logits + scaling x MSE of each encoder's features to its frozen
    single-modality teacher's (hooks: the loss)."""

    name = "unimodal_teacher"
    title = "Uni-Modal Teacher"
    paper = ("C. Du, J. Teng, T. Li, Y. Liu, T. Yuan, Y. Wang, Y. Yuan, H. Zhao, On Uni-modal "
             "Feature Learning in Supervised Multi-modal Learning, ICML")
    year = 2023
    summary = "fused CE + each encoder's MSE to a unimodal teacher"
    code = ("GeWu-Lab/BalanceBenchmark (balancemm/trainer/UMT_trainer.py, "
            "configs/trainer_config.yaml, balancemm/models/avclassify_model.py) @ 4c1482f; "
            "no code of the authors found")
    differences = (
        "Authors' code: none released; BalanceMM's re-implementation is the reference",
        "BalanceMM: the teacher is the run --teacher names (BalanceMM: the newest run folder "
        "of its naming scheme), refused unless it has the student's encoder",
        "BalanceMM: only the teacher's encoder runs (the same features, without its head)",
        "BalanceMM: --unimodal-teacher-mode eval gives teachers in eval mode (BalanceMM's are "
        "always in train mode, the default)",
        "BalanceMM: any number of modalities; sequence models are refused",
    )
    signals = ("ce", "distill_<m>")
    # bench --tune: scaling, the weight of the distillation, is its strength; the features'
    # scale differs by encoder, so two decades
    options = (
        Option("modulation_start", int, 0, "first distilled epoch (0-based, inclusive)",
               minimum=0, shared=True),
        Option("modulation_end", int, 80, "last distilled epoch (inclusive)", minimum=0,
               shared=True),
        Option("runs", list, [],
               "MODALITY=RUN_DIR: a finished single-modality run whose best.pt is that "
               "modality's frozen teacher; one per modality", flag="--teacher",
               metavar="MODALITY=RUN_DIR"),
        Option("scaling", float, 10.0,
               "weight of each modality's feature MSE to its teacher (BalanceMM scaling)",
               minimum=0, search=Search(1.0, 100.0, log=True)),
        Option("mode", str, "train",
               "the teachers' forward: train (BalanceMM: batch statistics) or eval mode",
               choices=MODES),
    )
    teacher_setting = "unimodal_teacher_runs"

    def __init__(self, model, config=None, *, modalities=None, device="cpu"):
        super().__init__(model, config, modalities=modalities, device=device)
        c = self.config
        require_two_modalities(self.name, self.modalities)
        self.scaling, self.mode = self.opt.scaling, self.opt.mode
        self.start, self.end = self.opt.modulation_start, self.opt.modulation_end
        if self.end < self.start:
            raise UserError(f"--modulation-end ({self.end}) is before --modulation-start "
                            f"({self.start}); the window [start, end] is inclusive")
        bare = fused_model(model, self.name)
        from ..models import AVModel

        if not isinstance(bare, AVModel):  # its encoders' forward is not the feature path
            raise UserError(f"--method {self.name} distils the feature vectors of resnet18 or "
                            f"tiny encoders, not of the sequence model {bare.spec['model']!r} "
                            "(--model umt is a sequence transformer, not this method)")
        runs = teacher_runs(self.opt.runs)
        extra = [m for m in runs if m not in self.modalities]
        if extra:
            raise UserError(f"--teacher {extra[0]}=...: this run's modalities are "
                            f"{', '.join(self.modalities)}")
        missing = [m for m in self.modalities if m not in runs]
        if missing:
            raise UserError(f"--method {self.name} needs a teacher for every modality: missing "
                            + ", ".join(f"--teacher {m}=RUN_DIR" for m in missing)
                            + f" (a finished avtrain fit --modalities {missing[0]} run)")
        self.runs = {m: runs[m] for m in self.modalities}
        # a plain dict, not submodules: the teachers stay out of the student's state and
        # optimizer
        self.teachers = {m: load_teacher(m, run, bare, dataset=c.get("dataset"))
                         .to(self.device).train(self.mode == "train")
                         for m, run in self.runs.items()}
        self.digests = {m: weights_digest(t) for m, t in self.teachers.items()}
        self._features: dict[str, torch.Tensor] = {}
        for m in self.modalities:
            bare.encoders[m].register_forward_hook(self._keeper(m))
        self._teach: StepContext | None = None
        self._metrics: dict[str, torch.Tensor] = {}

    def _keeper(self, modality: str):
        def keep(module, inputs, output):
            if module.training and torch.is_grad_enabled():  # the training forward only
                self._features[modality] = output
        return keep

    def in_window(self, epoch: int) -> bool:
        return self.start <= epoch <= self.end

    def train_step(self, ctx: StepContext):
        self._features, self._teach = {}, ctx
        try:
            return super().train_step(ctx)
        finally:
            self._features, self._teach = {}, None

    @torch.no_grad()
    def teacher_features(self, batch: dict, autocast) -> dict[str, torch.Tensor]:
        """Each frozen teacher's encoder features of the batch, without gradients, in the mode
        --unimodal-teacher-mode set when it was loaded (nothing else switches it: the teachers
        are not part of the student's model)."""
        out = {}
        for m, teacher in self.teachers.items():
            with autocast():
                out[m] = teacher.features({m: batch[m]})[m]
        return out

    def loss(self, logits, labels, *, epoch, step):
        ce = F.cross_entropy(logits["fused"].float(), labels)
        if not self.in_window(epoch):
            self._metrics = {"ce": _dist.mean_(ce.detach().clone())}
            return ce
        ctx = self._teach
        if ctx is None or len(self._features) != len(self.modalities):
            raise RuntimeError("unimodal_teacher saw no encoder features of the training forward")
        mse = distillation_losses(self.teacher_features(ctx.batch, ctx.autocast), self._features)
        total = ce
        for m in self.modalities:
            total = total + self.scaling * mse[m]
        # the signal, averaged over the ranks (one small all-reduce, on the device): with equal
        # shares of the batch, the global batch's CE and MSEs
        signal = _dist.mean_(torch.stack([ce.detach(), *(mse[m].detach()
                                                         for m in self.modalities)]))
        self._metrics = {"ce": signal[0]}
        for i, m in enumerate(self.modalities):
            self._metrics[f"distill_{m}"] = signal[i + 1]
        return total

    def step_metrics(self):
        return dict(self._metrics)

    def state_dict(self):
        return {"teachers": dict(self.digests)}

    def load_state_dict(self, state):
        for m, digest in (state or {}).get("teachers", {}).items():
            if m in self.digests and self.digests[m] != digest:
                raise UserError(f"--teacher {m}={self.runs[m]} holds other weights than the "
                                "teacher this run started with; resume with that teacher")
