"""Beyond one device: a device mesh, how arrays are laid out on it, and multi-process start-up.

qlab uses JAX's own machinery only (``jax.sharding`` + ``jax.jit``; no ``pmap``, nothing home-made):

* :func:`make_mesh` builds a 2-D mesh with a ``"data"`` axis (the batch) and an ``"fsdp"`` axis (parameters,
  FSDP style); the batch is split over both axes, so every device sees ``batch / mesh.size`` rows.
* :func:`batch_sharding` / :func:`shard_batch` put a host batch on the mesh (every process passes the same
  global batch; each device takes its rows), :func:`param_shardings` lays out the training state: each array's
  ``axis`` is split over ``"fsdp"`` where it divides, everything else is replicated.
* Quantizer statistics do not depend on the layout: a per-channel scale over a weight whose contraction axis
  is split is an all-reduce that XLA inserts (tests compare with one device). A quantization *group* is never
  split: modules declare indivisible blocks (``indivisible_blocks()``, e.g. ``qlab.nn.QuantizedLayer`` for
  ``int4/g128``), and a layout that would cut one is an error (:func:`check_blocks`).
* :func:`initialize_from_env` starts ``jax.distributed`` when a launcher asked for several processes.

Example:
    >>> mesh = make_mesh()                       # all devices on the data axis
    >>> dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1}
    True
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Any, Iterator, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["DATA", "FSDP", "make_mesh", "parse_mesh", "use_mesh", "current_mesh", "batch_sharding", "shard_batch", "check_batch", "param_shardings", "leaf_sharding",
           "check_blocks", "module_blocks", "initialize_from_env"]

#: the mesh axis the batch is split over, and the one parameters are split over
DATA, FSDP = "data", "fsdp"


def make_mesh(data: int | None = None, fsdp: int = 1, devices=None) -> Mesh:
    """A ``(data, fsdp)`` device mesh over ``devices`` (default: every device of every process).
    ``data`` defaults to ``len(devices) // fsdp``; the product must equal the number of devices used.

    Example:
        >>> make_mesh(data=1, devices=jax.devices()[:1]).axis_names
        ('data', 'fsdp')
    """
    devs = list(jax.devices() if devices is None else devices)
    if not isinstance(fsdp, int) or fsdp < 1:
        raise ValueError(f"make_mesh: fsdp must be a positive integer, got {fsdp!r}")
    if data is None:
        if len(devs) % fsdp:
            raise ValueError(f"make_mesh: fsdp={fsdp} does not divide the {len(devs)} devices")
        data = len(devs) // fsdp
    if data * fsdp > len(devs) or data < 1:
        raise ValueError(f"make_mesh: data={data} x fsdp={fsdp} needs {data * fsdp} devices; there are {len(devs)}")
    return Mesh(np.array(devs[: data * fsdp]).reshape(data, fsdp), (DATA, FSDP))


def parse_mesh(text: str, devices=None) -> Mesh:
    """``"data=4"``, ``"data=2,fsdp=2"`` or ``"fsdp=2"`` -> :func:`make_mesh` (default: this process's own
    devices, ``jax.local_devices()``: a sweep worker splits its runs over its own host).

    Example:
        >>> dict(parse_mesh("data=1", devices=jax.devices()[:1]).shape)
        {'data': 1, 'fsdp': 1}
    """
    sizes: dict[str, int] = {}
    for part in str(text).split(","):
        k, sep, v = (t.strip() for t in part.partition("="))
        if not sep or k not in (DATA, FSDP) or not v.isdigit() or int(v) < 1 or k in sizes:
            raise ValueError(f"mesh {text!r}: write data=N and/or fsdp=M (positive integers), e.g. data=2,fsdp=2")
        sizes[k] = int(v)
    return make_mesh(sizes.get(DATA), sizes.get(FSDP, 1), jax.local_devices() if devices is None else devices)


_MESH: contextvars.ContextVar = contextvars.ContextVar("qlab_mesh", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None) -> Iterator[Mesh | None]:
    """Within this block :func:`qlab.train.train` calls that pass no ``mesh=`` use ``mesh`` (how a sweep's
    training methods run sharded without a study key).

    Example:
        >>> with use_mesh(make_mesh(devices=jax.devices()[:1])) as m:
        ...     current_mesh() is m
        True
        >>> current_mesh() is None
        True
    """
    token = _MESH.set(mesh)
    try:
        yield mesh
    finally:
        _MESH.reset(token)


def current_mesh() -> Mesh | None:
    """The mesh of the innermost :func:`use_mesh` block, else None.

    Example:
        >>> current_mesh() is None
        True
    """
    return _MESH.get()


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) axis split over every axis of ``mesh``, the other ``ndim - 1`` axes whole.

    Example:
        >>> batch_sharding(make_mesh(devices=jax.devices()[:1]), 2).spec
        P(('data', 'fsdp'), None)
    """
    return NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names), *([None] * (ndim - 1))))


def check_batch(batch, mesh: Mesh, micro_batches: int = 1) -> None:
    """A clear error unless every array's leading axis splits into ``micro_batches`` equal parts whose rows
    divide over the mesh's ``mesh.size`` devices.

    Example:
        >>> import numpy as np
        >>> check_batch(np.zeros((8, 3)), make_mesh(devices=jax.devices()[:1]), micro_batches=2)
    """
    need = mesh.size * micro_batches
    for a in jax.tree.leaves(batch):
        n = np.shape(a)[0] if np.ndim(a) else 0
        if n % need:
            raise ValueError(
                f"batch of {n} rows does not divide over the mesh {dict(mesh.shape)} ({mesh.size} devices)"
                + (f" x {micro_batches} micro-batches" if micro_batches > 1 else "")
                + f": use a batch_size that is a multiple of {need}")


def shard_batch(batch, mesh: Mesh):
    """Place a host batch (an array or a tuple of arrays, the same global batch in every process) on ``mesh``
    with :func:`batch_sharding`. Each device receives only its own rows.

    Example:
        >>> import numpy as np
        >>> x = shard_batch(np.arange(6.0).reshape(3, 2), make_mesh(devices=jax.devices()[:1]))
        >>> x.shape, float(x.sum())
        ((3, 2), 15.0)
    """
    check_batch(batch, mesh)

    def put(a):
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, batch_sharding(mesh, a.ndim), lambda idx: a[idx])

    return jax.tree.map(put, batch)


def _leaf_spec(shape, axis: int, n: int, names=(FSDP,)) -> PartitionSpec:
    if n == 1 or not shape:
        return PartitionSpec()
    ax = axis % len(shape) if -len(shape) <= axis < len(shape) else None
    if ax is None or shape[ax] % n:
        return PartitionSpec()
    split = names[0] if len(names) == 1 else tuple(names)
    return PartitionSpec(*[split if i == ax else None for i in range(len(shape))])


def param_shardings(state, mesh: Mesh, axis: int = 0, over: tuple[str, ...] = (FSDP,)):
    """Shardings for a state pytree (an ``nnx.State``, arrays): every array's ``axis`` (0: the first, e.g.
    ``nnx.Linear``'s input features; -1: the last) is split over the mesh axes ``over`` (default the
    ``"fsdp"`` axis) where its length divides by their total size; arrays where it does not (biases of odd
    size, scalars) are replicated. :func:`qlab.train.train` lays out parameters with ``over=("fsdp",)`` and the
    optimizer state with ``over=("data", "fsdp")`` (ZeRO-1: each device updates its share of the parameters).

    Example:
        >>> import jax.numpy as jnp
        >>> sh = param_shardings({"w": jnp.zeros((4, 2)), "b": jnp.zeros(())}, make_mesh(devices=jax.devices()[:1]))
        >>> sh["w"].spec, sh["b"].spec
        (P(), P())
    """
    return jax.tree.map(lambda a: leaf_sharding(a, mesh, axis, over), state)


def leaf_sharding(array, mesh: Mesh, axis: int = 0, over: tuple[str, ...] = (FSDP,)) -> NamedSharding:
    """The sharding :func:`param_shardings` gives one array.

    Example:
        >>> import numpy as np
        >>> leaf_sharding(np.zeros((4, 2)), make_mesh(devices=jax.devices()[:1])).spec  # fsdp=1: whole
        P()
    """
    names = tuple(a for a in over if a in mesh.shape)
    n = int(np.prod([mesh.shape[a] for a in names]))
    return NamedSharding(mesh, _leaf_spec(np.shape(array), axis, n, names))


def module_blocks(model) -> dict[tuple, dict[int, int]]:
    """``{state path: {axis: block}}`` of the arrays whose blocks must stay whole on one device, gathered from
    every sub-module that declares ``indivisible_blocks() -> {attribute path: {axis: block}}``.

    Example:
        >>> from flax import nnx
        >>> module_blocks(nnx.Linear(4, 2, rngs=nnx.Rngs(0)))
        {}
    """
    out = {}
    for path, m in nnx.iter_graph(model):
        declare = getattr(m, "indivisible_blocks", None)
        if isinstance(m, nnx.Module) and callable(declare):
            for sub, blocks in declare().items():
                out[tuple(path) + tuple(sub)] = dict(blocks)
    return out


def check_blocks(model, mesh: Mesh, axis: int = 0) -> None:
    """A clear error when :func:`param_shardings` (split ``axis`` over ``"fsdp"``) would cut a block that a
    module declared indivisible (a quantization group): each device's slice must hold whole blocks.

    Example:
        >>> from flax import nnx
        >>> check_blocks(nnx.Linear(4, 2, rngs=nnx.Rngs(0)), make_mesh(devices=jax.devices()[:1]))
    """
    n = mesh.shape[FSDP] if FSDP in mesh.shape else 1
    if n == 1:
        return
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    for path, blocks in module_blocks(model).items():
        if path not in flat:
            continue
        shape = np.shape(flat[path][...])
        spec = _leaf_spec(shape, axis, n)
        for i, name in enumerate(spec):
            if name == FSDP and blocks.get(i, 1) > 1 and (shape[i] // n) % blocks[i]:
                raise ValueError(
                    f"sharding {'/'.join(map(str, path))} {tuple(shape)} over fsdp={n} along axis {i} gives "
                    f"{shape[i] // n} rows per device, which splits its quantization groups of {blocks[i]}; "
                    f"pick fsdp so that {shape[i]} / fsdp is a multiple of {blocks[i]}, or fsdp_axis= another axis")


_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize_from_env(environ: Mapping[str, str] | None = None, *, dry_run: bool = False) -> dict[str, Any] | None:
    """Start ``jax.distributed`` when the environment asks for several processes, else do nothing (None).

    * ``JAX_COORDINATOR_ADDRESS`` (``host:port``), ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``: explicit (any
      launcher, a Kubernetes indexed Job, a shell loop); all three or none.
    * a SLURM step with several tasks (``SLURM_NTASKS > 1``): JAX's own SLURM detection (coordinator on the
      first node of ``SLURM_STEP_NODELIST``; ids from ``SLURM_PROCID``). A job array of one-task jobs starts
      no collective run: those are independent sweep workers sharing a results folder.

    Returns the arguments used (``dry_run`` only returns them). Call it before any other JAX call.

    Example:
        >>> initialize_from_env({}) is None
        True
        >>> initialize_from_env({"JAX_COORDINATOR_ADDRESS": "h:1234", "JAX_NUM_PROCESSES": "2",
        ...                      "JAX_PROCESS_ID": "1"}, dry_run=True)
        {'coordinator_address': 'h:1234', 'num_processes': 2, 'process_id': 1}
    """
    env = os.environ if environ is None else environ
    given = [k for k in _ENV if env.get(k)]
    if given and len(given) < len(_ENV):
        raise ValueError(f"initialize_from_env: {', '.join(given)} set but not {', '.join(set(_ENV) - set(given))}; "
                         "set all three or none")
    if given:
        try:
            kw = {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"],
                  "num_processes": int(env["JAX_NUM_PROCESSES"]), "process_id": int(env["JAX_PROCESS_ID"])}
        except ValueError:
            raise ValueError("initialize_from_env: JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers, got "
                             f"{env['JAX_NUM_PROCESSES']!r}, {env['JAX_PROCESS_ID']!r}") from None
        if not 0 <= kw["process_id"] < kw["num_processes"]:
            raise ValueError(f"initialize_from_env: JAX_PROCESS_ID={kw['process_id']} is not in "
                             f"[0, JAX_NUM_PROCESSES={kw['num_processes']})")
    elif int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        kw = {"cluster_detection_method": "slurm"}
    else:
        return None
    if not dry_run:
        jax.distributed.initialize(**kw)
    return kw
