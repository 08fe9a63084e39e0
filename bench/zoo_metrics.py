"""Benchmark zoo, metrics half: onnxruntime sessions, latency timing and each model's
task metric (top-k, accuracy, CER, Pearson, perplexity, fidelity)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
from zoo_data import DATA, THREADS, ZooError, iter_split, meta


def session(onnx_path: str | Path, threads: int = THREADS, spinning: bool = True):
    """CPU onnxruntime session with `threads` intra-op threads (1 inter-op). ``spinning``
    False: idle pool threads sleep instead of spinning (for sessions timed in turns)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])


def latency(onnx_path: str | Path, feed: dict[str, np.ndarray], runs: int = 20,
            warmup: int = 3, threads: int = THREADS) -> dict:
    """Wall time of sess.run on one feed: median/min/p90 over `runs` runs, in milliseconds."""
    sess = session(onnx_path, threads)
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"median_ms": float(np.median(times)), "min_ms": times[0],
            "p90_ms": times[int(0.9 * (len(times) - 1))], "runs": runs, "threads": threads}


def latency_interleaved(paths: list[str | Path], feed: dict[str, np.ndarray], rounds: int = 20,
                        warmup: int = 3) -> list[dict]:
    """Latency of several models measured in turns, so machine load hits them alike.

    Each round runs every model once with THREADS intra-op threads (wall time) and once more
    on a 1-thread session timed by the calling thread's CPU time, which other processes on a
    shared machine barely disturb. Pool threads do not spin between runs (a spinning pool of
    one session would steal a core from the next session timed). Returns per model:
    median_ms / min_ms (wall, THREADS threads) and cpu_ms (median thread CPU time, 1 thread).
    """
    import time

    wall = [session(p, THREADS, spinning=False) for p in paths]
    single = [session(p, 1, spinning=False) for p in paths]
    for s in wall + single:
        for _ in range(warmup):
            s.run(None, feed)
    times = [[] for _ in paths]
    cpu = [[] for _ in paths]
    for _ in range(rounds):
        for i in range(len(paths)):
            t0 = time.perf_counter()
            wall[i].run(None, feed)
            times[i].append((time.perf_counter() - t0) * 1e3)
            c0 = time.thread_time()  # a 1-thread session computes in the calling thread
            single[i].run(None, feed)
            cpu[i].append((time.thread_time() - c0) * 1e3)
    return [{"median_ms": float(np.median(t)), "min_ms": float(min(t)), "cpu_ms": float(np.median(c)),
             "rounds": rounds, "threads": THREADS} for t, c in zip(times, cpu)]



# ---- metrics -------------------------------------------------------------------------


def eval_topk(name: str, sess, split: str) -> dict:
    """top-k accuracy = mean over samples of [label in the k highest logits]."""
    labels = meta(name)["labels"][split]
    top1 = top5 = 0
    for feed, label in zip(iter_split(name, split), labels):
        logits = sess.run(None, feed)[0].reshape(-1)
        order = np.argsort(-logits)
        top1 += int(order[0] == label)
        top5 += int(label in order[:5])
    n = len(labels)
    return {"top1": top1 / n, "top5": top5 / n, "n": n}


def eval_accuracy(name: str, sess, split: str) -> dict:
    labels = meta(name)["labels"][split]
    hits = sum(int(np.argmax(sess.run(None, feed)[0]) == label)
               for feed, label in zip(iter_split(name, split), labels))
    return {"accuracy": hits / len(labels), "n": len(labels)}


def edit_distance(a, b) -> int:  # noqa: ANN001 - two sequences (strings, lists of ids)
    """Levenshtein distance (insert, delete, substitute each cost 1)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ctc_greedy_decode(probs: np.ndarray, charset: list[str]) -> str:
    """Best path: argmax per time step, merge repeats, drop blank (index 0).

    `charset` is the model's character list with the blank at 0, as built by prepare.
    """
    idx = probs.argmax(axis=-1)
    keep = np.ones(len(idx), dtype=bool)
    keep[1:] = idx[1:] != idx[:-1]
    keep &= idx != 0
    return "".join(charset[i] for i in idx[keep])


def eval_ocr(name: str, sess, split: str) -> dict:
    """CER = sum of edit distances / sum of reference lengths, over all lines.
    cer_stripped ignores leading/trailing spaces in the output (fp32's only errors are
    spurious spaces at the line ends, so it makes real character errors stand out)."""
    m = meta(name)
    charset, refs = m["charset"], m["labels"][split]
    errors = errors_stripped = chars = exact = 0
    for feed, ref in zip(iter_split(name, split), refs):
        hyp = ctc_greedy_decode(sess.run(None, feed)[0][0], charset)
        errors += edit_distance(hyp, ref)
        errors_stripped += edit_distance(hyp.strip(), ref)
        chars += len(ref)
        exact += int(hyp == ref)
    return {"cer": errors / chars, "cer_stripped": errors_stripped / chars,
            "line_accuracy": exact / len(refs), "n": len(refs), "chars": chars}


def _sentence_embedding(sess, feed: dict) -> np.ndarray:
    """The model's pooled output ("461" = masked mean of token states), else mean-pool."""
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(None, feed)))
    if "461" in outs:
        return outs["461"][0]
    tokens = next(v for v in outs.values() if v.ndim == 3)
    mask = feed["attention_mask"][..., None].astype(np.float32)
    return ((tokens * mask).sum(1) / np.maximum(mask.sum(1), 1e-9))[0]


def eval_lee(name: str, sess, split: str) -> dict:
    """Pearson r between cosine similarities of document embeddings and human ratings
    over the upper triangle (i < j) of the Lee 50x50 matrix; and, as extras, Spearman rho
    between word-embedding cosines and WordSim-353 / SimLex-999 human scores."""
    if split != "eval":
        raise ZooError("minilm has human ratings for the eval split only")
    emb = np.stack([_sentence_embedding(sess, f) for f in iter_split(name, split)])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    sims = emb @ emb.T
    m = meta(name)
    human = np.asarray(m["human_similarities"], dtype=np.float64)
    iu = np.triu_indices(len(human), 1)
    r = float(np.corrcoef(sims[iu], human[iu])[0, 1])
    out = {"pearson": r, "pairs": len(iu[0]), "n": len(emb)}
    words_dir = DATA / name / "words"
    if m.get("word_pairs") and words_dir.exists():
        wemb = np.stack([_sentence_embedding(sess, dict(np.load(p)))
                         for p in sorted(words_dir.glob("*.npz"))])
        wemb /= np.linalg.norm(wemb, axis=1, keepdims=True)
        for test, pairs in m["word_pairs"].items():
            i, j, gold = (np.array(c) for c in zip(*pairs))
            cos = (wemb[i.astype(int)] * wemb[j.astype(int)]).sum(1)
            out[f"{test}_spearman"] = spearman(cos, gold)
    return out


def _rank(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    inv = np.empty_like(order)
    inv[order] = np.arange(len(x))
    xs = x[order]
    first = np.r_[True, xs[1:] != xs[:-1]]
    dense = first.cumsum()[inv]
    bounds = np.r_[np.nonzero(first)[0], len(x)]
    return 0.5 * (bounds[dense] + bounds[dense - 1] + 1)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rho = Pearson r of the (tie-averaged) ranks."""
    return float(np.corrcoef(_rank(np.asarray(a, float)), _rank(np.asarray(b, float)))[0, 1])


def eval_perplexity(name: str, sess, split: str) -> dict:
    """PPL = exp(mean over windows and positions t of -log p(x[t+1] | x[<=t]))."""
    nll, count = 0.0, 0
    for feed in iter_split(name, split):
        logits = sess.run(["logits"], feed)[0][0].astype(np.float64)  # [S, V]
        ids = feed["input_ids"][0]
        logits, target = logits[:-1], ids[1:]
        top = logits.max(axis=1)
        logz = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
        nll += float((logz - logits[np.arange(len(target)), target]).sum())
        count += len(target)
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count}


def eval_fidelity(name: str, sess, split: str) -> dict:
    """Synthetic models: agreement with the fp32 outputs stored at prepare time.

    rel_l2 = ||y - y_fp32|| / ||y_fp32|| averaged over samples; cosine likewise;
    top1_agreement = share of samples whose argmax matches (classifiers only).
    """
    ref_dir = DATA / name / f"reference_{split}"
    rel, cos, agree = [], [], []
    for feed, ref_path in zip(iter_split(name, split), sorted(ref_dir.glob("*.npy"))):
        y = sess.run(None, feed)[0].astype(np.float64).ravel()
        r = np.load(ref_path).astype(np.float64).ravel()
        rel.append(np.linalg.norm(y - r) / np.linalg.norm(r))
        cos.append(float(y @ r / (np.linalg.norm(y) * np.linalg.norm(r))))
        agree.append(int(np.argmax(y) == np.argmax(r)))
    out = {"rel_l2": float(np.mean(rel)), "cosine": float(np.mean(cos)), "n": len(rel)}
    if meta(name).get("classifier"):
        out["top1_agreement"] = float(np.mean(agree))
    return out
