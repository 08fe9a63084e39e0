"""Train the bundled `make demo` model: a small CNN on scikit-learn's digits, in pure numpy.

Writes, next to this file:
  digits_cnn.onnx        the trained model (opset 17), input ``input`` [N,1,16,16] float32,
                         output ``logits`` [N,10]
  data/calib/            128 calibration samples, ``sample_0000.npy`` ... each [1,1,16,16] float32
  data/eval/             the held-out samples the same way, plus ``labels.txt``

Data: the 1,797 8x8 digits images (pixel values 0..16) are upsampled to 16x16 with
bilinear interpolation on half-pixel centres (ONNX Resize ``half_pixel``, edge-clamped),
then divided by 16 so pixels lie in [0, 1]. A seeded permutation puts 400 images in the
held-out eval split; the remaining 1,397 are the train split, and the calibration samples
are the first 128 of the train split (never held-out data).

Model (NCHW):
  Conv 1->16 3x3 pad 1 (no bias) -> BatchNormalization -> Relu
  Conv 16->32 3x3 pad 1 -> Relu -> MaxPool 2x2                     [N,32,8,8]
  Conv 32->32 3x3 pad 1 -> Relu -> Add (identity residual)         [N,32,8,8]
  MaxPool 2x2 -> Flatten                                           [N,512]
  MatMul 512x256 + Add -> Relu -> MatMul 256x10 + Add              [N,10] logits
The second MaxPool keeps the first classifier weight at 512x256 (K a multiple of 32, big
enough for 4-bit block quantization to matter) while the whole model stays ~0.6 MB.

Training: mini-batch Adam on softmax cross-entropy, im2col convolutions and hand-written
backprop; BatchNorm uses batch statistics in training and running statistics in the export.

Usage:  python examples/train_digits.py [--epochs 12] [--seed 0]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
N_EVAL = 400
N_CALIB = 128
BN_EPS = 1e-5
BN_MOMENTUM = 0.1  # running = (1 - m) * running + m * batch, as in PyTorch


# ---------------------------------------------------------------------------------- data


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] interpolation matrix: half-pixel centres, src = (dst + 0.5) * n_in / n_out - 0.5,
    clamped to the edge, so ``A @ img @ A.T`` is a separable bilinear resize."""
    a = np.zeros((n_out, n_in), dtype=np.float64)
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    a[np.arange(n_out), lo] += 1 - frac
    a[np.arange(n_out), hi] += frac
    return a


def load_digits_16() -> tuple[np.ndarray, np.ndarray]:
    """Digits as x [N,1,16,16] float32 in [0,1] (bilinear upsample of 8x8, pixel / 16), y [N] int64."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    a = bilinear_matrix(8, 16)
    imgs = np.einsum("oi,nij,pj->nop", a, digits.images.astype(np.float64), a) / 16.0
    x = np.clip(imgs, 0.0, 1.0).astype(np.float32)[:, None, :, :]
    return x, digits.target.astype(np.int64)


def split_indices(n: int, seed: int) -> dict[str, np.ndarray]:
    """Deterministic split: eval = first N_EVAL of a seeded permutation, train = the rest,
    calib = the first N_CALIB of train."""
    perm = np.random.default_rng(seed).permutation(n)
    train = perm[N_EVAL:]
    return {"eval": perm[:N_EVAL], "train": train, "calib": train[:N_CALIB]}


# -------------------------------------------------------------------------------- layers
# Each *_forward returns (out, cache); each *_backward takes (dout, cache) and returns the
# input gradient first, then parameter gradients. dtype follows the inputs (float64 for the
# gradient check, float32 for training).


def conv2d_forward(x, w, b, pad=1):
    """Stride-1 convolution via im2col: out[n,f,i,j] = sum_{c,u,v} xpad[n,c,i+u,j+v] w[f,c,u,v] + b[f]."""
    n, c, h, wd = x.shape
    f, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho, wo = h + 2 * pad - kh + 1, wd + 2 * pad - kw + 1
    win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))  # n,c,ho,wo,kh,kw
    cols = np.ascontiguousarray(win.transpose(0, 2, 3, 1, 4, 5)).reshape(n * ho * wo, c * kh * kw)
    out = cols @ w.reshape(f, -1).T
    if b is not None:
        out += b
    out = out.reshape(n, ho, wo, f).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(out), (x.shape, w, cols, pad, b is not None)


def conv2d_backward(dout, cache):
    x_shape, w, cols, pad, has_bias = cache
    n, c, h, wd = x_shape
    f, _, kh, kw = w.shape
    ho, wo = dout.shape[2], dout.shape[3]
    d2 = dout.transpose(0, 2, 3, 1).reshape(-1, f)
    dw = (d2.T @ cols).reshape(w.shape)
    db = d2.sum(axis=0) if has_bias else None
    dcols = (d2 @ w.reshape(f, -1)).reshape(n, ho, wo, c, kh, kw)
    dxp = np.zeros((n, c, h + 2 * pad, wd + 2 * pad), dtype=dout.dtype)
    for u in range(kh):  # col2im: scatter each kernel tap back onto the padded input
        for v in range(kw):
            dxp[:, :, u : u + ho, v : v + wo] += dcols[:, :, :, :, u, v].transpose(0, 3, 1, 2)
    dx = dxp[:, :, pad : pad + h, pad : pad + wd]
    return dx, dw, db


def batchnorm_forward(x, gamma, beta, eps=BN_EPS):
    """Training mode: y = gamma * (x - mean) / sqrt(var + eps) + beta, statistics over (N,H,W)."""
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = x.var(axis=(0, 2, 3), keepdims=True)
    inv_std = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean) * inv_std
    y = gamma[None, :, None, None] * xhat + beta[None, :, None, None]
    return y, (xhat, inv_std, gamma, mean.ravel(), var.ravel())


def batchnorm_backward(dy, cache):
    xhat, inv_std, gamma, _, _ = cache
    m = dy.shape[0] * dy.shape[2] * dy.shape[3]
    dgamma = (dy * xhat).sum(axis=(0, 2, 3))
    dbeta = dy.sum(axis=(0, 2, 3))
    dxhat = dy * gamma[None, :, None, None]
    dx = (inv_std / m) * (
        m * dxhat
        - dxhat.sum(axis=(0, 2, 3), keepdims=True)
        - xhat * (dxhat * xhat).sum(axis=(0, 2, 3), keepdims=True)
    )
    return dx, dgamma, dbeta


def batchnorm_infer(x, gamma, beta, mean, var, eps=BN_EPS):
    """Inference mode, as ONNX BatchNormalization: y = gamma * (x - mean) / sqrt(var + eps) + beta."""
    scale = gamma / np.sqrt(var + eps)
    return x * scale[None, :, None, None] + (beta - mean * scale)[None, :, None, None]


def relu_forward(x):
    return np.maximum(x, 0), x > 0


def relu_backward(dout, mask):
    return dout * mask


def maxpool2_forward(x):
    """2x2 max pool, stride 2; the argmax of each window is kept for the backward pass."""
    n, c, h, w = x.shape
    win = (
        x.reshape(n, c, h // 2, 2, w // 2, 2)
        .transpose(0, 1, 2, 4, 3, 5)
        .reshape(n, c, h // 2, w // 2, 4)
    )
    idx = win.argmax(axis=-1)[..., None]
    return np.take_along_axis(win, idx, axis=-1)[..., 0], (x.shape, idx)


def maxpool2_backward(dout, cache):
    (n, c, h, w), idx = cache
    dwin = np.zeros((n, c, h // 2, w // 2, 4), dtype=dout.dtype)
    np.put_along_axis(dwin, idx, dout[..., None], axis=-1)
    return dwin.reshape(n, c, h // 2, w // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h, w)


def softmax_cross_entropy(logits, y):
    """Mean over the batch of -log softmax(logits)[y]; returns (loss, dloss/dlogits)."""
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    n = logits.shape[0]
    loss = -logp[np.arange(n), y].mean()
    dlogits = np.exp(logp)
    dlogits[np.arange(n), y] -= 1
    return loss, dlogits / n


# --------------------------------------------------------------------------------- model


def init_params(rng, channels=(16, 32, 32), hidden=256, image=16, classes=10, dtype=np.float32):
    """He-normal weights, zero biases; BN starts as identity with running stats (0, 1)."""
    c1, c2, c3 = channels
    flat = c3 * (image // 4) ** 2

    def he(shape, fan_in):
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(dtype)

    return {
        "conv1_w": he((c1, 1, 3, 3), 9),
        "bn_gamma": np.ones(c1, dtype),
        "bn_beta": np.zeros(c1, dtype),
        "bn_mean": np.zeros(c1, dtype),
        "bn_var": np.ones(c1, dtype),
        "conv2_w": he((c2, c1, 3, 3), 9 * c1),
        "conv2_b": np.zeros(c2, dtype),
        "conv3_w": he((c3, c2, 3, 3), 9 * c2),
        "conv3_b": np.zeros(c3, dtype),
        "fc1_w": he((flat, hidden), flat),
        "fc1_b": np.zeros(hidden, dtype),
        # A smaller last layer starts with small logits: a calmer first epoch.
        "fc2_w": he((hidden, classes), hidden) / 4,
        "fc2_b": np.zeros(classes, dtype),
    }


# Every parameter, in the order the ONNX initializers are written.
PARAMETERS = (
    "conv1_w",
    "bn_gamma",
    "bn_beta",
    "bn_mean",
    "bn_var",
    "conv2_w",
    "conv2_b",
    "conv3_w",
    "conv3_b",
    "fc1_w",
    "fc1_b",
    "fc2_w",
    "fc2_b",
)
# Running statistics are state, not trained parameters.
TRAINABLE = tuple(k for k in PARAMETERS if k not in ("bn_mean", "bn_var"))


def forward(p, x, train):
    """Logits and the caches backward() needs. train=True uses batch statistics in BN."""
    caches = {}
    h, caches["conv1"] = conv2d_forward(x, p["conv1_w"], None)
    if train:
        h, caches["bn"] = batchnorm_forward(h, p["bn_gamma"], p["bn_beta"])
    else:
        h = batchnorm_infer(h, p["bn_gamma"], p["bn_beta"], p["bn_mean"], p["bn_var"])
    h, caches["relu1"] = relu_forward(h)
    h, caches["conv2"] = conv2d_forward(h, p["conv2_w"], p["conv2_b"])
    h, caches["relu2"] = relu_forward(h)
    skip, caches["pool1"] = maxpool2_forward(h)
    h, caches["conv3"] = conv2d_forward(skip, p["conv3_w"], p["conv3_b"])
    h, caches["relu3"] = relu_forward(h)
    h, caches["pool2"] = maxpool2_forward(skip + h)
    flat = h.reshape(h.shape[0], -1)  # C,H,W order, same as ONNX Flatten(axis=1) on NCHW
    caches["flat"] = flat
    h = flat @ p["fc1_w"] + p["fc1_b"]
    h, caches["relu4"] = relu_forward(h)
    caches["hidden"] = h
    return h @ p["fc2_w"] + p["fc2_b"], caches


def backward(p, dlogits, caches):
    """Gradients of the loss for every TRAINABLE parameter, plus "input"."""
    g = {}
    g["fc2_w"] = caches["hidden"].T @ dlogits
    g["fc2_b"] = dlogits.sum(axis=0)
    d = relu_backward(dlogits @ p["fc2_w"].T, caches["relu4"])
    g["fc1_w"] = caches["flat"].T @ d
    g["fc1_b"] = d.sum(axis=0)
    d = (d @ p["fc1_w"].T).reshape(
        caches["pool2"][0][0], -1, *(s // 2 for s in caches["pool2"][0][2:])
    )
    d_sum = maxpool2_backward(d, caches["pool2"])
    d = relu_backward(d_sum, caches["relu3"])
    d, g["conv3_w"], g["conv3_b"] = conv2d_backward(d, caches["conv3"])
    d = maxpool2_backward(d + d_sum, caches["pool1"])  # residual: both branches feed pool1's output
    d = relu_backward(d, caches["relu2"])
    d, g["conv2_w"], g["conv2_b"] = conv2d_backward(d, caches["conv2"])
    d = relu_backward(d, caches["relu1"])
    d, g["bn_gamma"], g["bn_beta"] = batchnorm_backward(d, caches["bn"])
    g["input"], g["conv1_w"], _ = conv2d_backward(d, caches["conv1"])
    return g


def loss_and_grads(p, x, y):
    logits, caches = forward(p, x, train=True)
    loss, dlogits = softmax_cross_entropy(logits, y)
    return loss, backward(p, dlogits, caches), caches


def predict(p, x, batch=256):
    return np.concatenate(
        [forward(p, x[i : i + batch], train=False)[0] for i in range(0, len(x), batch)]
    )


# ------------------------------------------------------------------------------ training


def train(x, y, epochs, seed, batch=64, lr=2e-3, weight_decay=1e-2, log=print):
    """AdamW: p -= lr_t * (m_hat / (sqrt(v_hat) + 1e-8) + weight_decay * p), decay on weights only,
    lr_t = lr * (1 + cos(pi * step / total)) / 2."""
    rng = np.random.default_rng(seed)
    p = init_params(rng)
    m = {k: np.zeros_like(p[k]) for k in TRAINABLE}
    v = {k: np.zeros_like(p[k]) for k in TRAINABLE}
    b1, b2, step = 0.9, 0.999, 0
    steps_per_epoch = -(-len(x) // batch)
    total = epochs * steps_per_epoch
    for epoch in range(epochs):
        order = rng.permutation(len(x))
        losses = []
        for i in range(0, len(x), batch):
            idx = order[i : i + batch]
            loss, g, caches = loss_and_grads(p, x[idx], y[idx])
            _, _, _, bmean, bvar = caches["bn"]
            p["bn_mean"] = (1 - BN_MOMENTUM) * p["bn_mean"] + BN_MOMENTUM * bmean.astype(np.float32)
            p["bn_var"] = (1 - BN_MOMENTUM) * p["bn_var"] + BN_MOMENTUM * bvar.astype(np.float32)
            step += 1
            lr_t = lr * 0.5 * (1 + np.cos(np.pi * (step - 1) / total))
            for k in TRAINABLE:
                m[k] = b1 * m[k] + (1 - b1) * g[k]
                v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
                upd = (m[k] / (1 - b1**step)) / (np.sqrt(v[k] / (1 - b2**step)) + 1e-8)
                if k.endswith("_w"):
                    upd = upd + weight_decay * p[k]
                p[k] = (p[k] - lr_t * upd).astype(np.float32)
            losses.append(loss)
        log(f"epoch {epoch + 1:2d}/{epochs}  loss {np.mean(losses):.4f}")
    return p


# -------------------------------------------------------------------------------- export


def export_onnx(p, path):
    """Write the inference graph with onnx.helper: opset 17, IR version 8, symbolic batch 'N'."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array(np.ascontiguousarray(p[k], dtype=np.float32), k)
        for k in PARAMETERS
    ]
    conv = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    pool = {"kernel_shape": [2, 2], "strides": [2, 2]}
    nodes = [
        helper.make_node("Conv", ["input", "conv1_w"], ["conv1"], name="conv1", **conv),
        helper.make_node(
            "BatchNormalization",
            ["conv1", "bn_gamma", "bn_beta", "bn_mean", "bn_var"],
            ["bn1"],
            name="bn1",
            epsilon=BN_EPS,
        ),
        helper.make_node("Relu", ["bn1"], ["relu1"], name="relu1"),
        helper.make_node("Conv", ["relu1", "conv2_w", "conv2_b"], ["conv2"], name="conv2", **conv),
        helper.make_node("Relu", ["conv2"], ["relu2"], name="relu2"),
        helper.make_node("MaxPool", ["relu2"], ["pool1"], name="pool1", **pool),
        helper.make_node("Conv", ["pool1", "conv3_w", "conv3_b"], ["conv3"], name="conv3", **conv),
        helper.make_node("Relu", ["conv3"], ["relu3"], name="relu3"),
        helper.make_node("Add", ["pool1", "relu3"], ["residual"], name="residual"),
        helper.make_node("MaxPool", ["residual"], ["pool2"], name="pool2", **pool),
        helper.make_node("Flatten", ["pool2"], ["flat"], name="flatten", axis=1),
        helper.make_node("MatMul", ["flat", "fc1_w"], ["fc1_mm"], name="fc1_matmul"),
        helper.make_node("Add", ["fc1_mm", "fc1_b"], ["fc1"], name="fc1_add"),
        helper.make_node("Relu", ["fc1"], ["relu4"], name="relu4"),
        helper.make_node("MatMul", ["relu4", "fc2_w"], ["fc2_mm"], name="fc2_matmul"),
        helper.make_node("Add", ["fc2_mm", "fc2_b"], ["logits"], name="fc2_add"),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17)],
        producer_name="qtool-examples",
        ir_version=8,
    )
    model.doc_string = (
        "CNN on sklearn digits upsampled to 16x16, pixels in [0,1]; see examples/README.md"
    )
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return model


def write_folder(folder: Path, x: np.ndarray, labels: np.ndarray | None = None) -> None:
    """One [1,1,16,16] float32 .npy per sample; labels.txt follows the sorted filename order."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("sample_*.npy"):
        old.unlink()
    for i, sample in enumerate(x):
        np.save(folder / f"sample_{i:04d}.npy", sample[None].astype(np.float32))
    if labels is not None:
        (folder / "labels.txt").write_text("".join(f"{int(v)}\n" for v in labels))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=HERE)
    args = ap.parse_args(argv)

    x, y = load_digits_16()
    split = split_indices(len(x), args.seed)
    print(
        f"train {len(split['train'])}  calib {len(split['calib'])} (from train)  eval {len(split['eval'])}"
    )

    t0 = time.perf_counter()
    p = train(x[split["train"]], y[split["train"]], args.epochs, args.seed)
    train_s = time.perf_counter() - t0
    print(f"training time {train_s:.1f} s")

    x_eval, y_eval = x[split["eval"]], y[split["eval"]]
    ref = predict(p, x_eval)
    acc_np = float((ref.argmax(1) == y_eval).mean())

    out = args.out_dir
    model_path = out / "digits_cnn.onnx"
    export_onnx(p, model_path)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input": x_eval})[0]
    diff = float(np.abs(got - ref).max())
    acc_ort = float((got.argmax(1) == y_eval).mean())
    if diff >= 1e-4 or acc_ort != acc_np:
        raise SystemExit(
            f"onnxruntime disagrees with numpy: max abs diff {diff:.3g}, "
            f"accuracy {acc_ort:.4f} vs {acc_np:.4f}"
        )

    write_folder(out / "data" / "calib", x[split["calib"]])
    write_folder(out / "data" / "eval", x_eval, y_eval)

    n_params = sum(int(p[k].size) for k in p)
    print(f"parameters {n_params}  model {model_path.stat().st_size} bytes")
    print(f"onnxruntime vs numpy max abs diff {diff:.2e}")
    print(f"held-out accuracy {acc_ort:.4f} ({round(acc_ort * len(y_eval))}/{len(y_eval)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
