"""The diffusion backend: jobs → prompts, control images and per-job generators → images.

Two kinds of model folder run here:
- a chexforge pipeline (ChexGen-style DiT, text + mask/box guidance; `chexforge models init`,
  `train` or `import-chexgen` make one);
- any diffusers text-to-image pipeline folder (RoentGen, Sana or PixArt-Σ fine-tunes): text only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ... import __version__
from ...contracts.sample import Sample
from ...devices import torch_device
from ...errors import UserError
from ...models.folder import model_kind
from .options import DiffusionOptions


class DiffusionBackend:
    name = "diffusion"

    def __init__(self, options: DiffusionOptions, *, model: str | Path | None = None, **_: Any):
        # Extra arguments (the runtime's `size`) are ignored: each job states its own size.
        if model is None:
            raise UserError("the diffusion backend needs `model: PATH` (a local model folder)")
        self.options = options
        self.folder = Path(model)
        self.device = torch_device(options.device)
        self.autocast = options.dtype == "bf16" or (options.dtype == "auto" and self.device.type == "cuda")
        self.kind = model_kind(self.folder)
        if self.kind == "chexforge":
            from ...models.pipeline import ChexforgePipeline

            self.pipe = ChexforgePipeline.load(self.folder, self.device)
            if options.sampler is None:  # the model's own (chexforge.json): chexgen for imported ChexGen checkpoints
                self.options = options = options.model_copy(update={"sampler": self.pipe.conditioning.sampler})
            if options.prefix is not None:
                self.pipe.conditioning.prefix = options.prefix
            if options.fused_qkv:
                self.pipe.transformer.base.fuse_qkv_projections()
            if options.compile:
                self.pipe.transformer = torch.compile(self.pipe.transformer)
            self.model_hash = self.pipe.parameters_hash()
        else:
            self.pipe = _load_diffusers(self.folder, self.device, self.autocast)
            self.model_hash = _folder_hash(self.folder)

    def identity(self) -> dict[str, Any]:
        o = self.options
        sampler = {"sampler": o.sampler, "steps": o.steps, "guidance_text": o.guidance_text,
                   "guidance_control": o.guidance_control, "control_strength": o.control_strength,
                   "autocast_bf16": self.autocast, "kind": self.kind}
        if self.kind == "chexforge":
            c = self.pipe.conditioning
            sampler.update(prefix=c.prefix, guidance_text=o.guidance_text if o.guidance_text is not None else c.guidance_text)
            if o.sampler == "chexgen" and self.pipe.transformer.control is not None:
                sampler.update(guidance_text=None, guidance_control=None)  # ChexGen's control sampler does not guide
        sampler.update(_steps_run(self, o))  # the steps that run, not the option's None
        return {"backend": "diffusion", "backend_version": __version__, "model": self.folder.name,
                "model_hash": self.model_hash, "sampler": sampler}

    def generate(self, jobs: list[dict[str, Any]]) -> list[Sample]:
        """Each job at its own size: one sampling call per size in the batch, results in job order."""
        done: dict[int, Sample] = {}
        for size, where in _by_size(jobs).items():
            done.update(zip(where, self._generate([jobs[i] for i in where], size)))
        return [done[i] for i in range(len(jobs))]

    def _generate(self, jobs: list[dict[str, Any]], size: int) -> list[Sample]:
        """Jobs of one size, sampled together."""
        generators = [torch.Generator().manual_seed(int(j["seed"]) & 0x7FFF_FFFF_FFFF_FFFF) for j in jobs]
        if self.kind == "chexforge":
            images, prompts, masks = self._guided(jobs, generators, size)
        else:
            prompts = [str(j.get("prompt") or "") for j in jobs]
            images, masks = self._text_only(prompts, generators, size), [{} for _ in jobs]
        out = []
        for job, image, prompt, m in zip(jobs, images, prompts, masks):
            meta = {"prompt_used": prompt, "seed": int(job["seed"])}
            out.append(Sample(job["job_id"], np.ascontiguousarray(image, dtype=np.float32), m, list(job.get("boxes") or []), meta))
        return out

    def _guided(self, jobs, generators, size):
        from ...models import control_image

        o = self.options
        prompts = self.pipe.prompts_for(jobs)
        masks = [_layout_masks(j, size) for j in jobs]
        control = None
        if self.pipe.transformer.control is not None:
            control = control_image.to_tensor([control_image.draw(size, j.get("boxes"), m) for j, m in zip(jobs, masks)])
        images = self.pipe.sample(prompts, generators, size, control=control, steps=o.steps, sampler=o.sampler,
                                  guidance_text=o.guidance_text, guidance_control=o.guidance_control,
                                  control_strength=o.control_strength, vae_slice=o.vae_slice, autocast=self.autocast)
        return images, prompts, masks

    def _text_only(self, prompts, generators, size):
        o = self.options
        kwargs = {"prompt": prompts, "generator": generators, "height": size, "width": size, "output_type": "np"}
        if o.steps:
            kwargs["num_inference_steps"] = o.steps
        if o.guidance_text is not None:
            kwargs["guidance_scale"] = o.guidance_text
        import inspect

        accepted = inspect.signature(self.pipe.__call__).parameters
        if "use_resolution_binning" in accepted:
            kwargs["use_resolution_binning"] = False  # PixArt/Sana: render exactly the asked size
        if "clean_caption" in accepted:
            kwargs["clean_caption"] = False  # reports are already clean; the cleaner needs extra packages
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            images = self.pipe(**kwargs).images
        images = np.asarray(images, dtype=np.float32)
        return images.mean(-1) if images.ndim == 4 else images


def _steps_run(backend: DiffusionBackend, o: DiffusionOptions) -> dict[str, Any]:
    """The step count and scheduler a sampling call uses, for the manifest's sampler JSON."""
    if backend.kind == "chexforge":
        from ...models import schedulers

        sched = schedulers.sampler(o.sampler, backend.pipe.train_scheduler.config)
        return {"steps": o.steps or schedulers.DEFAULT_STEPS[o.sampler], "scheduler": type(sched).__name__}
    import inspect

    default = inspect.signature(backend.pipe.__call__).parameters.get("num_inference_steps")
    steps = o.steps or (default.default if default is not None and default.default is not inspect.Parameter.empty else None)
    return {"steps": steps, "scheduler": type(getattr(backend.pipe, "scheduler", None)).__name__}


def _by_size(jobs: list[dict[str, Any]]) -> dict[int, list[int]]:
    """Job indices per image size, sizes in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(int(job["size"]), []).append(i)
    return groups


def _layout_masks(job: dict[str, Any], size: int) -> dict[str, np.ndarray]:
    """The masks a job's layout chose (`mask_ref`, `;`-separated): `explicit:<png>` named by its
    folder (the finding), `prior:siim#...` (Pneumothorax) and `prior:lungs#...` (lungs)."""
    from PIL import Image

    out: dict[str, np.ndarray] = {}
    for ref in str(job.get("mask_ref") or "").split(";"):
        if ref.startswith("explicit:"):
            path = Path(ref.removeprefix("explicit:"))
            if path.suffix.lower() == ".png" and path.is_file():
                with Image.open(path) as im:
                    out[path.parent.name] = np.asarray(im.convert("L").resize((size, size), Image.NEAREST)) > 127
        elif ref.startswith("prior:"):
            from ...priors import masks as library

            name = "Pneumothorax" if ref.startswith("prior:siim#") else "lungs"
            out[name] = library.load(ref, size)
    return out


def _load_diffusers(folder: Path, device: torch.device, autocast: bool):
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                 low_cpu_mem_usage=False)
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"cannot load as a diffusers pipeline ({str(e).splitlines()[0][:200]})", folder) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _folder_hash(folder: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix in (".safetensors", ".bin", ".json", ".txt", ".model"):
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(str(p.stat().st_size).encode())
            with open(p, "rb") as f:
                h.update(f.read(1 << 20))  # first MiB of each file: cheap and changes with the weights
    return h.hexdigest()[:16]
