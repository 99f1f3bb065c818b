"""Auto-AVSR's beam search one clip at a time, written from ../shared/reference/auto_avsr_notes.md (ESPnet's
BatchBeamSearch with CTCPrefixScorer, as auto_avsr configures them): the yardstick of the batched search in
section 7, and the one-clip side of bench/decode_speed.py.

Deliberately plain: hypotheses are Python dicts, the decoder re-reads each whole prefix every step (no cache),
and each hypothesis gets its own CTC prefix recursion."""
import torch

LOGZERO = -1e10


def ctc_prefix(r_prev, last, ids, lp, prefix_len, blank):
    """psi (S) and forward variables (T x 2 x S) of one hypothesis extended by each token of ids."""
    T, S = lp.size(0), len(ids)
    r_sum = torch.logsumexp(r_prev, 1)
    phi = r_sum[:, None].repeat(1, S)
    for s, c in enumerate(ids.tolist()):
        if c == last:
            phi[:, s] = r_prev[:, 1]
    r = torch.full((T, 2, S), LOGZERO)
    if prefix_len == 0:
        r[0, 0] = lp[0, ids]
    start = max(prefix_len, 1)
    for t in range(start, T):
        r[t, 0] = torch.logsumexp(torch.stack([r[t - 1, 0], phi[t - 1]]), 0) + lp[t, ids]
        r[t, 1] = torch.logsumexp(torch.stack([r[t - 1, 0], r[t - 1, 1]]), 0) + lp[t, blank]
    psi = torch.logsumexp(torch.cat([phi[start - 1:T - 1] + lp[start:T, ids], r[start - 1:start, 0]]), 0)
    return psi, r


def end_detect(ended, i, m=3, d_end=-10.0):
    if not ended:
        return False
    best = max(h["score"] for h in ended)
    count = 0
    for length in (i - k for k in range(m)):
        same = [h["score"] for h in ended if len(h["yseq"]) == length]
        if same and max(same) - best < d_end:
            count += 1
    return count == m


@torch.no_grad()
def beam_search_one_clip(model, enc, beam, ctc_weight, eos, blank, max_length_ratio=0.0, length_bonus=0.0,
                         lm=None, lm_weight=0.0):
    """enc: 1 x T x d, this clip's frames only. -> ended hypotheses, best first: dicts with yseq (sos ... eos)
    and score. `lm`, a language model (tokens -> log-probs of each next token), reads each whole prefix anew."""
    lp = model.ctc(enc)[0].float().log_softmax(-1).cpu()  # the CTC side runs on the CPU, the model where it is
    T, V = lp.shape
    w = ctc_weight
    pre_beam = int(1.5 * beam) if 0 < w < 1 and int(1.5 * beam) < V else None
    maxlen = T if max_length_ratio == 0 else max(1, int(max_length_ratio * T))
    r0 = torch.full((T, 2), LOGZERO)
    r0[:, 1] = torch.cumsum(lp[:, blank], 0)
    running = [{"yseq": [eos], "score": 0.0, "r": r0, "psi": 0.0}]
    ended = []
    for i in range(maxlen):
        if w < 1:
            ys = torch.tensor([h["yseq"] for h in running], device=enc.device)
            dec = model.decoder(ys, enc.expand(len(running), -1, -1))[:, -1].float().log_softmax(-1).cpu()
        if lm is not None:
            ys = torch.tensor([h["yseq"] for h in running], device=enc.device)
            lm_lp = lm(ys)[0][:, -1].float().cpu()
        rows, states = [], []
        for k, h in enumerate(running):
            scores = torch.zeros(V)
            if w < 1:
                scores += (1 - w) * dec[k]
            if lm is not None:
                scores += lm_weight * lm_lp[k]
            if length_bonus:
                scores += length_bonus
            log_psi, r_new, ids = None, None, None
            if w > 0:
                ids = torch.topk(scores, pre_beam).indices if pre_beam else torch.arange(V)
                psi, r_new = ctc_prefix(h["r"], h["yseq"][-1], ids, lp, i, blank)
                log_psi = torch.full((V,), LOGZERO)
                log_psi[ids] = psi
                log_psi[eos] = torch.logsumexp(h["r"][T - 1], 0)
                log_psi[blank] = LOGZERO
                scores += w * (log_psi - h["psi"])
            rows.append(scores + h["score"])
            states.append((log_psi, r_new, ids))
        flat = torch.stack(rows).view(-1)
        best = []
        for j in flat.topk(beam).indices.tolist():
            k, c = divmod(j, V)
            h = {"yseq": running[k]["yseq"] + [c], "score": flat[j].item()}
            log_psi, r_new, ids = states[k]
            if log_psi is not None:
                where = (ids == c).nonzero().flatten().tolist()
                h["r"], h["psi"] = r_new[:, :, where[0] if where else -1], log_psi[c]
            best.append(h)
        if i == maxlen - 1:
            for h in best:
                h["yseq"] = h["yseq"] + [eos]
        running = []
        for h in best:
            (ended if h["yseq"][-1] == eos else running).append(h)
        if max_length_ratio == 0 and end_detect(ended, i):
            break
        if not running:
            break
    return sorted(ended, key=lambda h: h["score"], reverse=True)
