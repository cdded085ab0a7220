"""One generation loop for both language models: greedy, sampling and beam search.

A Search chooses the tokens one step at a time from the logits it is given; `run` drives it over a
session with three calls: `prefill()`, `step(tokens)` and `reorder(rows)` (OPTSession, T5Session),
and a continuous batch (batching.py) drives many over one pool of rows. Scores are processed in the
reference's order so that greedy and beam search pick the same tokens as `transformers`' generate
on the same logits. Lengths always count new tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F

from ..config import matches


@dataclass
class GenerationConfig:
    """Decoding settings. Defaults are greedy decoding of up to 30 new tokens."""

    max_new_tokens: int = 30
    min_new_tokens: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    # Each setting: whether its value is in range (asked once its type is right), and the range in
    # words. Settings are checked in field order, so min_new_tokens and num_return_sequences compare
    # to a max_new_tokens and num_beams already checked.
    _ALLOWED = {
        "max_new_tokens": (lambda g: g.max_new_tokens >= 1, "an integer >= 1"),
        "min_new_tokens": (lambda g: 0 <= g.min_new_tokens <= g.max_new_tokens,
                           "an integer between 0 and max_new_tokens"),
        "num_beams": (lambda g: g.num_beams >= 1, "an integer >= 1"),
        "length_penalty": (lambda g: True, "a finite number"),
        "early_stopping": (lambda g: g.early_stopping in (True, False, "never"), "True, False or 'never'"),
        "num_return_sequences": (lambda g: 1 <= g.num_return_sequences and (
            g.num_beams == 1 or g.num_return_sequences <= g.num_beams), "an integer between 1 and num_beams"),
        "do_sample": (lambda g: True, "True or False"),
        "temperature": (lambda g: g.temperature > 0, "a finite number > 0"),
        "top_k": (lambda g: g.top_k >= 0, "an integer >= 0 (0: no top-k filtering)"),
        "top_p": (lambda g: 0 < g.top_p <= 1, "a number in (0, 1]"),
        # torch.Generator.manual_seed takes 64 bits.
        "seed": (lambda g: g.seed is None or 0 <= g.seed < 2**64, "None or an integer in [0, 2**64 - 1]"),
        "repetition_penalty": (lambda g: g.repetition_penalty > 0, "a finite number > 0"),
        "no_repeat_ngram_size": (lambda g: g.no_repeat_ngram_size >= 0, "an integer >= 0 (0: no n-gram ban)"),
    }
    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            in_range, allowed = self._ALLOWED[f.name]
            if not (matches(value, f.type) and in_range(self)):
                raise ValueError(f"{f.name} must be {allowed}, got {value!r}")

    @property
    def copies(self) -> int:
        """Rows decoded per input: the beams, or the sequences sampled or searched greedily."""
        return self.num_beams if self.num_beams > 1 else self.num_return_sequences

    @classmethod
    def make(cls, base: "GenerationConfig | None" = None, **overrides) -> "GenerationConfig":
        """Copy `base` (or the defaults) with overrides; an unknown setting is an error naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown generation setting(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        values = {f.name: getattr(base, f.name) for f in fields(cls)} if base else {}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass
class Hypothesis:
    """One generated continuation: its new token ids (end-of-sequence included when reached) and score."""

    token_ids: list[int]
    score: float
    finished: bool = field(default=True)


class ScoreProcessor:
    """The reference's logits processors, in its order: repetition penalty, n-gram ban, min new tokens;
    then, when sampling, temperature, top-k and top-p."""

    def __init__(self, gen: GenerationConfig, eos: torch.Tensor, prompt_len: int, ignore: torch.Tensor | None):
        self.gen, self.eos, self.prompt_len = gen, eos, prompt_len
        self.ignore = ignore  # [rows, prompt_len] True where the repetition penalty skips (leading padding)

    def __call__(self, history: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        gen = self.gen
        if gen.repetition_penalty != 1.0:
            ids = history
            if self.ignore is not None:
                vocab = scores.shape[-1]
                ids = history.clone()
                ids[:, : self.ignore.shape[1]].masked_fill_(self.ignore, vocab)
                scores = F.pad(scores, (0, 1))
            picked = scores.gather(1, ids)
            picked = torch.where(picked < 0, picked * gen.repetition_penalty, picked / gen.repetition_penalty)
            scores = scores.scatter(1, ids, picked)
            if self.ignore is not None:
                scores = scores[:, :-1]
        if gen.no_repeat_ngram_size > 0:
            scores = _ban_repeated_ngrams(history, scores, gen.no_repeat_ngram_size)
        if history.shape[1] - self.prompt_len < gen.min_new_tokens and len(self.eos):
            scores = scores.index_fill(1, self.eos, float("-inf"))
        return scores

    def warp(self, scores: torch.Tensor, min_keep: int = 1) -> torch.Tensor:
        gen = self.gen
        if gen.temperature != 1.0:
            scores = scores / gen.temperature
        if gen.top_k:
            k = min(max(gen.top_k, min_keep), scores.shape[-1])
            kth = torch.topk(scores, k)[0][..., -1, None]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if gen.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=False)
            cumulative = sorted_scores.softmax(-1).cumsum(-1)
            remove = cumulative <= 1 - gen.top_p
            remove[..., -min_keep:] = False
            scores = scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))
        return scores


def _ban_repeated_ngrams(history: torch.Tensor, scores: torch.Tensor, n: int) -> torch.Tensor:
    length = history.shape[1]
    if length + 1 < n:
        return scores
    scores = scores.clone()
    for row, ids in enumerate(history.tolist()):
        prefix = tuple(ids[length + 1 - n:])
        banned = {ids[i + n - 1] for i in range(length - n + 1) if tuple(ids[i:i + n - 1]) == prefix}
        if banned:
            scores[row, list(banned)] = float("-inf")
    return scores


def run(session, search: "Search") -> list[list[Hypothesis]]:
    """Decode a session to the end, its tokens chosen by `search`; the sequences of each input."""
    logits = session.prefill()
    while (tokens := search.advance(logits)) is not None:
        if search.reorder is not None:
            session.reorder(search.reorder)
        logits = session.step(tokens)
    return search.results()


class Search:
    """The choice of tokens for a batch of inputs, one step at a time: `advance(logits)` takes the
    logits of every row and returns the tokens to feed next (None when every row is done), after
    which `reorder` holds the rows to keep (beam search) or None. `results()` gives the sequences.
    A session drives it alone (generate) or among other requests' rows (a continuous batch)."""

    reorder: torch.Tensor | None = None

    @staticmethod
    def start(gen: GenerationConfig, history: torch.Tensor, eos_token_ids: list[int], pad_token_id: int,
              ignore: torch.Tensor | None = None) -> "Search":
        """The search for inputs whose processors see `history` [inputs, prompt_len] (the reference's
        input_ids for OPT, the decoder start token for T5); rows are the inputs repeated
        (num_beams or num_return_sequences) times."""
        device = history.device
        eos = torch.tensor(eos_token_ids, dtype=torch.long, device=device)
        generator = None
        if gen.do_sample:
            generator = torch.Generator(device=device)
            generator.manual_seed(gen.seed if gen.seed is not None else torch.seed())
        history = history.repeat_interleave(gen.copies, 0)
        if ignore is not None:
            ignore = ignore.repeat_interleave(gen.copies, 0)
        process = ScoreProcessor(gen, eos, history.shape[1], ignore)
        kind = BeamSearch if gen.num_beams > 1 else SampleOrGreedy
        return kind(history, gen, eos, pad_token_id, process, generator)

    def advance(self, logits: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError

    def results(self) -> list[list[Hypothesis]]:
        raise NotImplementedError


class SampleOrGreedy(Search):
    def __init__(self, history, gen, eos, pad, process, generator):
        self.history, self.gen, self.eos, self.pad, self.process, self.generator = \
            history, gen, eos, pad, process, generator
        rows = history.shape[0]
        self.unfinished = torch.ones(rows, dtype=torch.bool, device=history.device)
        self.produced = self.unfinished  # the rows whose last token is a real one (not padding after the end)
        self.total = torch.zeros(rows, device=history.device)
        self.new: list[torch.Tensor] = []

    def advance(self, logits: torch.Tensor) -> torch.Tensor | None:
        gen, process = self.gen, self.process
        scores = process(self.history, logits)
        if gen.do_sample:
            scores = process.warp(scores)
            probs = scores.softmax(-1)
            tokens = torch.multinomial(probs, 1, generator=self.generator)[:, 0]
        else:
            tokens = scores.argmax(-1)
        unfinished = self.unfinished
        self.produced = unfinished.clone()
        self.total += torch.where(unfinished, scores.log_softmax(-1).gather(1, tokens[:, None])[:, 0], 0.0)
        tokens = torch.where(unfinished, tokens, self.pad)
        self.new.append(tokens)
        self.history = torch.cat([self.history, tokens[:, None]], 1)
        unfinished &= ~torch.isin(tokens, self.eos)
        if len(self.new) == gen.max_new_tokens or not bool(unfinished.any()):
            return None
        return tokens

    def finished(self) -> list[bool]:
        """Per row: whether it has ended (end-of-sequence generated)."""
        return (~self.unfinished).tolist()

    def results(self) -> list[list[Hypothesis]]:
        out = torch.stack(self.new, 1).tolist()
        eos = self.eos.tolist()
        seqs = []
        for ids, score, done in zip(out, self.total.tolist(), self.finished()):
            if done:  # keep the end-of-sequence token, drop the padding after it
                ids = ids[: next(i for i, t in enumerate(ids) if t in eos) + 1]
            seqs.append(Hypothesis(ids, score, done))
        n = self.gen.num_return_sequences
        return [seqs[i:i + n] for i in range(0, len(seqs), n)]


class BeamSearch(Search):
    """The reference's vectorised beam search, step for step."""

    def __init__(self, history, gen, eos, pad, process, generator):
        self.gen, self.eos, self.process, self.generator = gen, eos, process, generator
        k = gen.num_beams
        rows, prompt_len = history.shape
        batch = rows // k
        device = history.device
        self.k, self.rows, self.batch, self.prompt_len = k, rows, batch, prompt_len
        self.max_length = prompt_len + gen.max_new_tokens
        self.keep = max(2, 1 + len(eos)) * k
        self.top_k_mask = torch.arange(self.keep, device=device) < k
        self.running = torch.full((batch, k, self.max_length), pad, dtype=torch.long, device=device)
        self.running[:, :, :prompt_len] = history.view(batch, k, prompt_len)
        self.done_seqs = self.running.clone()
        self.running_scores = torch.zeros(batch, k, device=device)
        self.running_scores[:, 1:] = -1e9
        self.done_scores = torch.full((batch, k), -1e9, device=device)
        self.done_lens = torch.zeros(batch, k, dtype=torch.long, device=device)
        self.finished = torch.zeros(batch, k, dtype=torch.bool, device=device)
        self.improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
        self.offsets = torch.arange(batch, device=device)[:, None] * k
        self.cur = prompt_len

    def advance(self, logits: torch.Tensor) -> torch.Tensor | None:
        gen, process, eos = self.gen, self.process, self.eos
        k, rows, batch, cur, max_length, prompt_len = \
            self.k, self.rows, self.batch, self.cur, self.max_length, self.prompt_len
        keep = self.keep
        log_probs = process(self.running[:, :, :cur].reshape(rows, cur), F.log_softmax(logits, -1))
        if gen.do_sample:
            log_probs = process.warp(log_probs, min_keep=len(eos) + 1)
        vocab = log_probs.shape[-1]
        log_probs = (log_probs.view(batch, k, vocab) + self.running_scores[:, :, None]).view(batch, k * vocab)
        if gen.do_sample:
            top_idx = torch.multinomial(log_probs.softmax(-1), keep, generator=self.generator)
            top_lp, order = log_probs.gather(1, top_idx).sort(-1, descending=True)
            top_idx = top_idx.gather(1, order)
        else:
            top_lp, top_idx = torch.topk(log_probs, keep)
        source = top_idx // vocab
        tokens = top_idx % vocab
        candidates = self.running.gather(1, source[:, :, None].expand(-1, -1, max_length)).clone()
        candidates[:, :, cur] = tokens
        hits = torch.isin(tokens, eos) | (cur + 1 >= max_length)
        # Live beams: the best k candidates that did not stop.
        live_lp = top_lp + hits.float() * -1e9
        pick = torch.topk(live_lp, k)[1]
        self.running = candidates.gather(1, pick[:, :, None].expand(-1, -1, max_length))
        self.running_scores = live_lp.gather(1, pick)
        beam_source = source.gather(1, pick)
        # Finished hypotheses: stopped candidates among the top k, scored with the length penalty.
        just_done = hits & self.top_k_mask[None, :]
        done_lp = top_lp / ((cur + 1 - prompt_len) ** gen.length_penalty)
        full = self.finished.all(-1, keepdim=True) & (gen.early_stopping is True)
        done_lp = done_lp + full.float() * -1e9 + (~self.improvable).float() * -1e9 + (~just_done).float() * -1e9
        merged_scores = torch.cat([self.done_scores, done_lp], 1)
        best = torch.topk(merged_scores, k)[1]
        self.done_seqs = torch.cat([self.done_seqs, candidates], 1).gather(1, best[:, :, None].expand(-1, -1, max_length))
        self.done_scores = merged_scores.gather(1, best)
        new_lens = torch.full_like(tokens, cur + 1 - prompt_len)
        self.done_lens = torch.cat([self.done_lens, new_lens], 1).gather(1, best)
        self.finished = torch.cat([self.finished, just_done], 1).gather(1, best)
        self.reorder = (beam_source + self.offsets).view(-1)
        self.cur = cur = cur + 1
        # Stop when no live beam can beat the worst finished one (the reference's heuristic).
        if gen.early_stopping == "never" and gen.length_penalty > 0:
            best_len = max_length - prompt_len
        else:
            best_len = cur - prompt_len
        best_possible = self.running_scores[:, :1] / (best_len ** gen.length_penalty)
        worst_done = torch.where(self.finished, self.done_scores.min(1, keepdim=True)[0], -1e9)
        self.improvable = self.improvable & (best_possible > worst_done).any(-1, keepdim=True)
        open_beams = not (bool(self.finished.all()) and gen.early_stopping is True)
        if not (bool(self.improvable.any()) and open_beams and not bool(hits.all())):
            return None
        return self.running[:, :, cur - 1].reshape(-1)

    def results(self) -> list[list[Hypothesis]]:
        n, prompt_len = self.gen.num_return_sequences, self.prompt_len
        out = []
        for b in range(self.batch):
            out.append([Hypothesis(self.done_seqs[b, i, prompt_len:prompt_len + int(self.done_lens[b, i])].tolist(),
                                   float(self.done_scores[b, i]), bool(self.finished[b, i])) for i in range(n)])
        return out
