"""NumPy oracles: the semantics of DESIGN.md §3/§5 written as plain loops over ranks."""

from __future__ import annotations

import numpy as np


def dest_rank(e: int, num_experts: int, num_ranks: int) -> int:
    return e // (num_experts // num_ranks) if 0 <= e < num_experts else -1


def dispatch(xs, idxs, ws, num_experts, layout, capacity, alignment=1):
    """xs/idxs/ws: per-rank lists of [T,W]/[T,K]/[T,K]. Returns one dict per receiving rank."""
    R = len(xs)
    T, K = idxs[0].shape
    L = num_experts // R
    results = []
    for me in range(R):
        rows = []  # (src, t, k or -1, local idx vector or scalar, weight)
        if layout == "rank":
            for s in range(R):
                for t in range(T):
                    local = [e - me * L if dest_rank(e, num_experts, R) == me else -1
                             for e in idxs[s][t]]
                    if any(l >= 0 for l in local):
                        wts = [ws[s][t][k] if local[k] >= 0 else 0.0 for k in range(K)]
                        rows.append((s, t, -1, local, wts))
            groups = None
        else:
            groups = []
            for l in range(L):
                group = []
                for s in range(R):
                    for t in range(T):
                        for k in range(K):
                            e = idxs[s][t][k]
                            if dest_rank(e, num_experts, R) == me and e - me * L == l:
                                group.append((s, t, k, l, ws[s][t][k]))
                pad = (-len(group)) % alignment
                groups.append((len(group), len(group) + pad))
                rows.extend(group + [None] * pad)
        needed = len(rows)
        W = xs[0].shape[1]
        out = dict(
            recv_x=np.zeros((capacity, W), xs[0].dtype),
            recv_topk_idx=np.full((capacity, K) if layout == "rank" else (capacity,), -1, np.int32),
            recv_topk_weights=np.zeros((capacity, K) if layout == "rank" else (capacity,),
                                       np.float32),
            recv_src_rank=np.full((capacity,), -1, np.int32),
            recv_src_token=np.full((capacity,), -1, np.int32),
            recv_src_slot=np.full((capacity,), -1, np.int32),
            num_recv_tokens=min(needed, capacity),
            num_overflow=max(needed - capacity, 0),
            num_recv_tokens_per_expert=np.zeros((L,), np.int32),
        )
        for i, row in enumerate(rows[:capacity]):
            if row is None:
                continue
            s, t, k, local, wts = row
            out["recv_x"][i] = xs[s][t]
            out["recv_topk_idx"][i] = local
            out["recv_topk_weights"][i] = wts
            out["recv_src_rank"][i], out["recv_src_token"][i], out["recv_src_slot"][i] = s, t, k
            for l in np.atleast_1d(local):
                if l >= 0:
                    out["num_recv_tokens_per_expert"][l] += 1
        if layout == "rank":
            out["group_sizes"] = out["num_recv_tokens_per_expert"].copy()
        else:
            sizes, start = [], 0
            for _, padded in groups:
                sizes.append(max(0, min(start + padded, capacity) - min(start, capacity)))
                start += padded
            out["group_sizes"] = np.array(sizes, np.int32)
        results.append(out)
    # send_pos, from the receivers' point of view
    for s in range(R):
        shape = (T, R) if layout == "rank" else (T, K)
        send_pos = np.full(shape, -1, np.int32)
        for me in range(R):
            o = results[me]
            for i in range(capacity):
                if o["recv_src_rank"][i] == s:
                    t = o["recv_src_token"][i]
                    col = me if layout == "rank" else o["recv_src_slot"][i]
                    send_pos[t, col] = i
        results[s]["send_pos"] = send_pos
    return results


def combine(ys, weights, recvs, num_tokens):
    """out[s][t] = sum over every rank's rows from (s, t) of w * y, in float64."""
    R = len(ys)
    outs = [np.zeros((num_tokens, ys[0].shape[1]), np.float64) for _ in range(R)]
    for me in range(R):
        for i, (s, t) in enumerate(zip(recvs[me]["recv_src_rank"], recvs[me]["recv_src_token"])):
            if s >= 0:
                w = 1.0 if weights is None else float(weights[me][i])
                outs[s][t] += w * ys[me][i].astype(np.float64)
    return outs


def moe(xs, idxs, ws, num_experts, expert_fn):
    """sum_k w[t,k] * f_e(x[t]) for every rank's tokens (the end-to-end MoE oracle)."""
    outs = []
    for x, idx, w in zip(xs, idxs, ws):
        out = np.zeros(x.shape, np.float64)
        for t in range(x.shape[0]):
            for k in range(idx.shape[1]):
                e = idx[t, k]
                if 0 <= e < num_experts:
                    out[t] += w[t, k] * expert_fn(e, x[t].astype(np.float64))
        outs.append(out)
    return outs


def low_latency_dispatch(xs, idxs, num_experts, max_tokens):
    """Per receiving rank: recv_x [L, R*M, H], recv_count [L], rows per (expert, src)."""
    R = len(xs)
    L = num_experts // R
    H = xs[0].shape[1]
    results = []
    for me in range(R):
        recv = np.zeros((L, R * max_tokens, H), xs[0].dtype)
        src_token = np.full((L, R * max_tokens), -1, np.int32)
        count = np.zeros((L,), np.int32)
        for l in range(L):
            e = me * L + l
            for s in range(R):
                n = 0
                for t in range(xs[s].shape[0]):
                    if e in set(int(v) for v in idxs[s][t]):
                        recv[l, s * max_tokens + n] = xs[s][t]
                        src_token[l, s * max_tokens + n] = t
                        n += 1
                count[l] += n
        results.append(dict(recv_x=recv, recv_count=count, recv_src_token=src_token))
    return results
