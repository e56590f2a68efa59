"""Task families: distributions over small inner problems that train in lock-step.

A task family draws *tasks* (a descriptor of tensors: which dataset, which re-parameterisation
scales...), initial parameters and data batches, each from a ``torch.Generator`` the caller
seeds, and computes the inner loss. Every task of a family has the same parameter shapes, so
many tasks — and the antithetic copies of each — train together as one batched computation
with a leading *member* axis (see :mod:`lopt_hf.metatrain.unroll`).

Families:

* :class:`MLPImageTaskFamily` (``"mlp_image"``) — MLP classifiers on small grayscale images
  (the learned-optimizers tutorial's task), with per-task dataset, initialisation and
  re-parameterisation scales.
* :class:`LinearRegressionTaskFamily` (``"linear_regression"``) — least squares in a handful
  of dimensions; small enough that exact meta-gradients are cheap (tests, smoke runs).

Inner losses enter the meta-loss *normalised* (:meth:`TaskFamily.normalized_loss`): clipped to
``[0, loss_cap]``, non-finite values replaced by the cap, then divided by ``loss_scale``. For
classification ``loss_scale = ln C`` (the loss of a uniform guess) and ``loss_cap = 1.5 ln C``,
so the normalised loss lies in ``[0, 1.5]`` and a diverged inner model costs 1.5.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.func import grad_and_value, vmap

from ..data import ImageDataset, load_image_dataset

Params = dict[str, Tensor]
TaskDescriptor = dict[str, Tensor]
Batch = dict[str, Tensor]

# The re-parameterisation scale of parameter tensor ``name`` lives under this key of a task.
SCALE_PREFIX = "scale/"


class TaskFamily(ABC):
    """A distribution over inner problems with identical parameter shapes.

    Batched methods take tensors with a leading member axis ``M`` (one row per inner problem:
    tasks × antithetic copies); single-problem methods take them without it.
    """

    name: ClassVar[str]
    dtype: torch.dtype = torch.float32
    loss_scale: float = 1.0  # the normalised loss is clip(loss) / loss_scale
    loss_cap: float = math.inf  # raw-loss cap; non-finite losses count as the cap

    # ---------------------------------------------------------------- per task (generator-driven)
    @property
    @abstractmethod
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name → shape of every inner parameter tensor (the same for all tasks)."""

    @abstractmethod
    def sample_task(self, generator: torch.Generator) -> TaskDescriptor:
        """A task descriptor: scalars/tensors that select the problem (dataset, scales...)."""

    @abstractmethod
    def init_params(self, task: TaskDescriptor, generator: torch.Generator) -> Params:
        """Initial inner parameters of ``task``."""

    @abstractmethod
    def sample_batches(self, task: TaskDescriptor, generator: torch.Generator, num_steps: int) -> Batch:
        """Data for ``num_steps`` inner steps: every tensor has a leading ``num_steps`` axis."""

    @abstractmethod
    def loss(self, params: Params, task: TaskDescriptor, batch: Batch) -> Tensor:
        """Scalar training loss of one problem on one batch (differentiable in ``params``)."""

    # --------------------------------------------------------------------------------- batched
    def loss_and_grad(self, params: Params, task: TaskDescriptor, batch: Batch) -> tuple[Tensor, Params]:
        """``(loss (M,), grads)`` for ``M`` problems at once (every input has a leading ``M`` axis).

        ``torch.func.vmap(grad_and_value(loss))``: the matmuls of all members become single
        ``bmm`` calls. A hand-written batched forward/backward for the MLP family measured no
        faster (eager: 10.3 vs 9.9 ms per step for 64 members; traced and compiled into the
        inner step: 11.6 vs 9.9 ms; BPTT through 3 steps: equal), so there is none. The result
        is differentiable with respect to ``params`` (BPTT backpropagates through it).
        """
        grads, loss = vmap(grad_and_value(self.loss))(params, task, batch)
        return loss, grads

    def normalized_loss(self, loss: Tensor) -> Tensor:
        """The meta-loss contribution of an inner loss: clipped, non-finite → cap, scaled."""
        cap = torch.as_tensor(self.loss_cap, dtype=loss.dtype, device=loss.device)
        clipped = torch.minimum(torch.clamp_min(loss, 0.0), cap)
        return torch.where(torch.isfinite(loss), clipped, cap) / self.loss_scale

    def config(self) -> dict[str, Any]:
        """JSON-serialisable description (meta-training provenance)."""
        return {"name": self.name}


def _log_uniform(low: float, high: float, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    if low == high:
        return torch.tensor(float(low), dtype=dtype)
    u = torch.rand((), generator=generator, dtype=torch.float64)
    return torch.exp(math.log(low) + u * (math.log(high) - math.log(low))).to(dtype)


def _check_scale_range(param_scale_range: Sequence[float]) -> tuple[float, float]:
    low, high = (float(value) for value in param_scale_range)
    if not 0 < low <= high:
        raise ValueError(f"param_scale_range must satisfy 0 < low <= high, got {param_scale_range}")
    return low, high


class MLPImageTaskFamily(TaskFamily):
    """MLP classifiers on ``image_size²``-pixel grayscale images, one dataset per task.

    ``datasets`` are names for :func:`lopt_hf.data.load_image_dataset`: built-in (``digits``,
    ``fashion_mnist``, ``mnist``), a local path (an ``.npz`` file, a ``save_to_disk`` folder, a folder
    of data files) or a Hugging Face Hub dataset id. Per task: the dataset (uniform over ``datasets``),
    the initialisation, the data batches and, per parameter tensor, a re-parameterisation scale ``s``
    drawn log-uniformly from ``param_scale_range``: the stored parameter is ``w / s`` and the loss uses ``s * stored``,
    so the function is unchanged but the optimizer sees gradients ``s`` times larger and must
    move ``1/s`` times further (``(1, 1)`` disables it). Weights start from a normal with std
    ``1/sqrt(fan_in)`` truncated at 2 std (haiku's default), biases at zero.

    All datasets of a family must have the same number of classes.
    """

    name = "mlp_image"

    def __init__(self, datasets: Sequence[str] | str = ("digits",), hidden_sizes: Sequence[int] = (128,),
                 image_size: int = 8, batch_size: int = 128, param_scale_range: Sequence[float] = (1.0, 1.0),
                 activation: str = "relu", split: str = "train", cache_dir: str | None = None,
                 dtype: torch.dtype | str = torch.float32) -> None:
        self.dataset_names = [datasets] if isinstance(datasets, str) else list(datasets)
        if not self.dataset_names:
            raise ValueError("datasets must name at least one dataset")
        self.hidden_sizes = tuple(int(size) for size in hidden_sizes)
        if any(size <= 0 for size in self.hidden_sizes):
            raise ValueError(f"hidden_sizes must be positive, got {hidden_sizes}")
        if activation not in ("relu", "tanh"):
            raise ValueError(f"activation must be 'relu' or 'tanh', got {activation!r}")
        self.activation = activation
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.param_scale_range = _check_scale_range(param_scale_range)
        self.split = split
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype

        loaded: list[ImageDataset] = [load_image_dataset(name, self.image_size, split, cache_dir)
                                      for name in self.dataset_names]
        classes = {dataset.name: dataset.num_classes for dataset in loaded}
        if len(set(classes.values())) != 1:
            raise ValueError(f"all datasets of a family need the same number of classes, got {classes}")
        self.num_classes = loaded[0].num_classes
        self.dataset_sizes = [len(dataset) for dataset in loaded]
        self._offsets = [sum(self.dataset_sizes[:index]) for index in range(len(loaded))]
        self._images = torch.cat([dataset.images for dataset in loaded]).to(self.dtype)
        self._labels = torch.cat([dataset.labels for dataset in loaded])
        self.input_size = self.image_size ** 2
        self.loss_scale = math.log(self.num_classes)
        self.loss_cap = 1.5 * self.loss_scale
        self._layer_sizes = [self.input_size, *self.hidden_sizes, self.num_classes]

    @property
    def num_layers(self) -> int:
        return len(self._layer_sizes) - 1

    @property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for layer, (fan_in, fan_out) in enumerate(zip(self._layer_sizes[:-1], self._layer_sizes[1:])):
            shapes[f"w{layer}"] = (fan_in, fan_out)
            shapes[f"b{layer}"] = (fan_out,)
        return shapes

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "datasets": self.dataset_names, "hidden_sizes": list(self.hidden_sizes),
                "image_size": self.image_size, "batch_size": self.batch_size,
                "param_scale_range": list(self.param_scale_range), "activation": self.activation,
                "split": self.split, "num_classes": self.num_classes}

    def sample_task(self, generator: torch.Generator) -> TaskDescriptor:
        dataset = torch.randint(0, len(self.dataset_names), (), generator=generator)
        task = {"dataset": dataset}
        for key in self.param_shapes:
            task[SCALE_PREFIX + key] = _log_uniform(*self.param_scale_range, generator, self.dtype)
        return task

    def init_params(self, task: TaskDescriptor, generator: torch.Generator) -> Params:
        params = {}
        for key, shape in self.param_shapes.items():
            if len(shape) == 2:
                value = torch.empty(shape, dtype=torch.float32)
                torch.nn.init.trunc_normal_(value, mean=0.0, std=1.0, a=-2.0, b=2.0, generator=generator)
                value = (value / math.sqrt(shape[0])).to(self.dtype)
            else:
                value = torch.zeros(shape, dtype=self.dtype)
            params[key] = value / task[SCALE_PREFIX + key]
        return params

    def sample_batches(self, task: TaskDescriptor, generator: torch.Generator, num_steps: int) -> Batch:
        dataset = int(task["dataset"])
        rows = torch.randint(0, self.dataset_sizes[dataset], (num_steps, self.batch_size), generator=generator)
        rows = (rows + self._offsets[dataset]).reshape(-1)
        shape = (num_steps, self.batch_size)
        return {"inputs": self._images.index_select(0, rows).reshape(*shape, self.input_size),
                "labels": self._labels.index_select(0, rows).reshape(shape)}

    # ------------------------------------------------------------------------------- the model
    def _act(self, x: Tensor) -> Tensor:
        return torch.relu(x) if self.activation == "relu" else torch.tanh(x)

    def loss(self, params: Params, task: TaskDescriptor, batch: Batch) -> Tensor:
        h = batch["inputs"]
        for layer in range(self.num_layers):
            weight = params[f"w{layer}"] * task[f"{SCALE_PREFIX}w{layer}"]
            bias = params[f"b{layer}"] * task[f"{SCALE_PREFIX}b{layer}"]
            h = h @ weight + bias
            if layer < self.num_layers - 1:
                h = self._act(h)
        log_probs = torch.log_softmax(h, dim=-1)
        return -torch.take_along_dim(log_probs, batch["labels"].unsqueeze(-1), dim=-1).mean()


class LinearRegressionTaskFamily(TaskFamily):
    """Least squares ``0.5 * mean((x @ w - y)**2)`` with ``y = x @ w_target + noise``.

    Per task: ``w_target ~ N(0, I)``, ``w_0 ~ N(0, init_std² I)`` (divided by the
    re-parameterisation scale), fresh ``x ~ N(0, I)`` each step. With ``deterministic=True``
    every task, initialisation and batch is the same fixed draw (seeded by ``problem_seed``),
    so the meta-loss is a deterministic function of the meta-parameters: exact meta-gradients
    by autograd are the ground truth for estimator tests.
    """

    name = "linear_regression"

    def __init__(self, num_features: int = 2, batch_size: int = 8, noise_std: float = 0.0, init_std: float = 1.0,
                 param_scale_range: Sequence[float] = (1.0, 1.0), deterministic: bool = False,
                 problem_seed: int = 0, loss_cap: float = 100.0, dtype: torch.dtype | str = torch.float32) -> None:
        self.num_features = int(num_features)
        self.batch_size = int(batch_size)
        self.noise_std = float(noise_std)
        self.init_std = float(init_std)
        self.param_scale_range = _check_scale_range(param_scale_range)
        self.deterministic = bool(deterministic)
        self.problem_seed = int(problem_seed)
        self.loss_cap = float(loss_cap)
        self.loss_scale = 1.0
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype

    @property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"w": (self.num_features,)}

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "num_features": self.num_features, "batch_size": self.batch_size,
                "noise_std": self.noise_std, "init_std": self.init_std,
                "param_scale_range": list(self.param_scale_range), "deterministic": self.deterministic}

    def _own(self, generator: torch.Generator, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.problem_seed * 1000 + salt) if self.deterministic else generator

    def sample_task(self, generator: torch.Generator) -> TaskDescriptor:
        generator = self._own(generator, 1)
        target = torch.randn(self.num_features, generator=generator, dtype=torch.float64).to(self.dtype)
        return {"target": target, SCALE_PREFIX + "w": _log_uniform(*self.param_scale_range, generator, self.dtype)}

    def init_params(self, task: TaskDescriptor, generator: torch.Generator) -> Params:
        generator = self._own(generator, 2)
        start = self.init_std * torch.randn(self.num_features, generator=generator, dtype=torch.float64)
        return {"w": start.to(self.dtype) / task[SCALE_PREFIX + "w"]}

    def sample_batches(self, task: TaskDescriptor, generator: torch.Generator, num_steps: int) -> Batch:
        shape = (self.batch_size, self.num_features)
        if self.deterministic:
            one = torch.randn(shape, generator=self._own(generator, 3), dtype=torch.float64).to(self.dtype)
            inputs = one.expand(num_steps, *shape).clone()
            noise = torch.zeros(num_steps, self.batch_size, dtype=self.dtype)
        else:
            inputs = torch.randn((num_steps, *shape), generator=generator, dtype=torch.float64).to(self.dtype)
            noise = self.noise_std * torch.randn((num_steps, self.batch_size), generator=generator,
                                                 dtype=torch.float64).to(self.dtype)
        return {"inputs": inputs, "targets": inputs @ task["target"] + noise}

    def loss(self, params: Params, task: TaskDescriptor, batch: Batch) -> Tensor:
        residual = batch["inputs"] @ (params["w"] * task[SCALE_PREFIX + "w"]) - batch["targets"]
        return 0.5 * torch.mean(residual * residual)


TASK_FAMILIES: dict[str, type[TaskFamily]] = {
    MLPImageTaskFamily.name: MLPImageTaskFamily,
    LinearRegressionTaskFamily.name: LinearRegressionTaskFamily,
}


def build_task_family(name: str, **options: Any) -> TaskFamily:
    """Instantiate the task family ``name`` (``mlp_image``, ``linear_regression``) with ``options``."""
    try:
        family_class = TASK_FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown task family {name!r}; available: {sorted(TASK_FAMILIES)}") from None
    return family_class(**options)  # type: ignore[call-arg]
