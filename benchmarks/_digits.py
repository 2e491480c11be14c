"""Shared pieces of the digits experiments: data, models, training, output.

scikit-learn's `load_digits` (1797 8x8 images, 10 classes; ships with scikit-learn, no
download). Split fixed once (`random_state=0`, 20% test, stratified); features standardised
with the training statistics, and the pixels that are constant on the training set dropped
(they would only add exact zero modes to every Hessian and nothing else).

Models are [`gaugejax.nn.MLP`][] with ReLU, so `gaugejax.derive_gauge` gives a
`PositiveMonomial` (permutation times positive scaling) site per hidden layer.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import gaugejax as gj


RESULTS = pathlib.Path(__file__).resolve().parent / "results"


class Data(eqx.Module):
    xtr: jax.Array
    ytr: jax.Array
    xte: jax.Array
    yte: jax.Array

    @property
    def n_features(self) -> int:
        return int(self.xtr.shape[1])


def load(dtype: Any = jnp.float32, test_size: float = 0.2) -> Data:
    """The fixed, standardised digits split (training statistics only)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_size, random_state=0, stratify=y)
    mu, sd = xtr.mean(0), xtr.std(0)
    keep = sd > 0
    xtr = (xtr[:, keep] - mu[keep]) / sd[keep]
    xte = (xte[:, keep] - mu[keep]) / sd[keep]
    return Data(jnp.asarray(xtr, dtype), jnp.asarray(ytr, jnp.int32), jnp.asarray(xte, dtype), jnp.asarray(yte, jnp.int32))


def make_mlp(n_in: int, hidden: Sequence[int], key, dtype: Any = jnp.float32, n_out: int = 10,
             activation: Callable = jax.nn.relu) -> gj.nn.MLP:
    return gj.nn.MLP([n_in, *hidden, n_out], activation, key=key, dtype=dtype)


def ce(model, x, y) -> jax.Array:
    """Mean cross-entropy."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(model(x), y))


def error(model, x, y) -> jax.Array:
    """Classification error (1 - accuracy)."""
    return 1.0 - jnp.mean((jnp.argmax(model(x), -1) == y).astype(x.dtype))


def preactivations(model, x) -> dict[str, jax.Array]:
    """`{site: (batch, n)}` pre-activations of every hidden layer (the sites of
    `derive_gauge(model)` are named h1, h2, ...), for [`gaugejax.repair`][]."""
    out = {}
    for i, layer in enumerate(model.layers[:-1]):
        z = jnp.matmul(x, layer.weight.T, precision=jax.lax.Precision.HIGHEST) + layer.bias[None, :]
        out[f"h{i + 1}"] = z
        x = model.activation(z)
    return out


def batches(key, n: int, batch_size: int, steps: int) -> jax.Array:
    """`(steps, batch_size)` minibatch indices: epochs of random permutations."""
    per_epoch = n // batch_size
    epochs = -(-steps // per_epoch)
    keys = jax.random.split(key, epochs)
    idx = jnp.concatenate([jax.random.permutation(k, n)[: per_epoch * batch_size].reshape(per_epoch, batch_size)
                           for k in keys])
    return idx[:steps]


def train(model, tx: optax.GradientTransformation, data: Data, steps: int, *, key, batch_size: int = 128,
          state=None, loss: Callable = ce, weight_decay_l2: float = 0.0):
    """`steps` minibatch steps of `tx` on the cross-entropy (plus `weight_decay_l2 * |theta|^2`),
    one `lax.scan` (compiled once per shape). Returns `(model, opt_state, train_losses)`."""
    if state is None:
        state = tx.init(model)
    idx = batches(key, data.xtr.shape[0], batch_size, steps)
    model, state, losses = _train_scan(model, state, tx, data.xtr, data.ytr, idx, loss, weight_decay_l2)
    return model, state, losses


@eqx.filter_jit
def _train_scan(model, state, tx, x, y, idx, loss, wd):
    def objective(m, xb, yb):
        out = loss(m, xb, yb)
        if wd:
            out = out + wd * sum(jnp.sum(p**2) for p in jax.tree.leaves(m))
        return out

    def step(carry, i):
        m, s = carry
        val, grads = jax.value_and_grad(objective)(m, x[i], y[i])
        u, s = tx.update(grads, s, m)
        return (optax.apply_updates(m, u), s), val

    (model, state), losses = jax.lax.scan(step, (model, state), idx)
    return model, state, losses


evaluate = eqx.filter_jit(lambda m, x, y: (ce(m, x, y), error(m, x, y)))


def env() -> dict:
    """Environment of a run (as the other benchmark scripts record it)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=RESULTS.parent).stdout.strip()
    except OSError:  # pragma: no cover
        commit = None
    return {"jax": jax.__version__, "equinox": eqx.__version__, "optax": optax.__version__,
            "device": str(jax.devices()[0]), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "loadavg": os.getloadavg(), "git_commit": commit, "x64": bool(jax.config.jax_enable_x64)}


def stats(values) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std()), "n": int(a.size)}


def write(out: dict, path: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.setdefault("env", env())
    path.write_text(json.dumps(out, indent=2, default=_jsonable))
    return path


def _jsonable(x):
    if isinstance(x, (np.ndarray, jax.Array)):
        return np.asarray(x).tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(type(x))


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
