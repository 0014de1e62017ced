"""Helpers the benchmark scripts beside this file share: the machine description, exact top-k, recall, linear probe.

Importing it loads no numerical library, so a script can import it before it sets thread counts.
"""

import os
import platform


def machine() -> str:
    """CPU model, logical cores, RAM and kernel, e.g. 'AMD EPYC ..., 2 logical cores, 23 GB RAM, Linux 6.1'."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {os.cpu_count()} logical cores, {memory_gb:.0f} GB RAM, {platform.system()} {platform.release()}"


def append_xla_flags(flags: str) -> None:
    """Appends `flags` to XLA_FLAGS and defaults JAX_PLATFORMS to cpu; call before jax is imported."""
    if flags:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def exact_top_k(keys, queries, k: int, chunk: int = 100_000):
    """int64 [Q, k] exact top-k rows of `keys` [N, D] by dot product with `queries` [Q, D], scoring
    `chunk` rows at a time so that [Q, N] scores never sit in memory at once (keys may be memory-mapped)."""
    import numpy as np

    best_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_ids = np.full((len(queries), k), -1, dtype=np.int64)
    for start in range(0, len(keys), chunk):
        scores = queries @ np.asarray(keys[start : start + chunk]).T
        top = np.argpartition(-scores, min(k, scores.shape[1] - 1), axis=1)[:, :k]
        merged_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, axis=1)], axis=1)
        merged_ids = np.concatenate([best_ids, top + start], axis=1)
        order = np.argsort(-merged_scores, axis=1)[:, :k]
        best_scores = np.take_along_axis(merged_scores, order, axis=1)
        best_ids = np.take_along_axis(merged_ids, order, axis=1)
    return best_ids


def recall_at_k(found_ids, true_ids) -> float:
    """Fraction of the true top-k ids [Q, k] found among the first k of `found_ids` [Q, >= k]."""
    k = true_ids.shape[1]
    hits = sum(len(set(found[:k].tolist()) & set(true.tolist())) for found, true in zip(found_ids, true_ids))
    return hits / true_ids.size


def linear_probe(features, targets, num_classes: int, steps: int = 500, seed: int = 0) -> float:
    """Held-out accuracy of a softmax (multinomial logistic) regression on standardized features.

    features: float [N, D]; targets: int [N] in [0, num_classes). A seeded half of the rows fits the
    weights (Adam, full batch, `steps` steps, L2 1e-3), the other half is scored.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    features = np.asarray(features, np.float32)
    targets = np.asarray(targets)
    features = (features - features.mean(0)) / (features.std(0) + 1e-6)
    features = np.concatenate([features, np.ones((len(features), 1), features.dtype)], axis=1)
    order = np.random.default_rng(seed).permutation(len(features))
    train, test = order[: len(order) // 2], order[len(order) // 2 :]
    optimizer = optax.adam(0.05)

    def loss(weights, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(x @ weights, y).mean() + 1e-3 * jnp.sum(weights**2)

    @jax.jit
    def step(weights, state, x, y):
        grads = jax.grad(loss)(weights, x, y)
        updates, state = optimizer.update(grads, state)
        return weights + updates, state

    weights = jnp.zeros((features.shape[1], num_classes))
    state = optimizer.init(weights)
    for _ in range(steps):
        weights, state = step(weights, state, features[train], targets[train])
    return float(np.mean(np.argmax(features[test] @ weights, axis=1) == targets[test]))
