"""Does this script's model compute what the upstream code computes with the same weights?

Builds the E2E model of a folder of Auto-AVSR's, ViSpeR's or the team's own source (fetched by you, never part
of this project) at the base size with random weights and random BatchNorm statistics, saves its state dict,
loads that into this script's `--preset base` with `--init-from`, and compares on a padded batch of clips of
different lengths: the frontend, encoder, CTC and decoder outputs of each clip in the batch against the upstream
model's forward of that clip alone (the way those repositories decode, one clip at a time). Video, audio and,
where the source has it, audio-visual; for the team's source (Essa-Ramzy/Arabic-Lip-Reading), its E2EVSR as its
backend builds it, with each of its three encoders and both token sets, first fitted by its own loss to a random
label a clip (--fit-steps), and then the best hypothesis of this script's beam search against their own
search's, run clip by clip as their backend runs it, with the time each took and how often their search run on
the padded batch differs from itself clip by clip. Prints the largest relative gap
(max |ours - theirs| / max |theirs|) of each.

    git clone https://github.com/YasserdahouML/visper /tmp/visper            # ViSpeR (its video and av models)
    git clone https://github.com/mpc001/auto_avsr /tmp/auto_avsr             # Auto-AVSR today (video, audio)
    git -C /tmp/auto_avsr worktree add /tmp/auto_avsr_v1 v1.0.0            # Auto-AVSR v1.0.0 (video, audio, av)
    git clone https://github.com/Essa-Ramzy/Arabic-Lip-Reading /tmp/team   # the team's (three encoders)
    python bench/upstream_equivalence.py /tmp/visper [/tmp/auto_avsr ... /tmp/team]

The upstream code needs torch, numpy and PyYAML (the configs of the older layout) beside this project's
requirements. Exit status 1 when a gap is 1e-4 or more.
"""
import argparse
import ast
import importlib
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import master_all_avsr as m  # noqa: E402

V, LENGTHS, TOLERANCE = 50, (29, 17, 23), 1e-4


def import_upstream(src: Path, module: str):
    """`module` of the espnet package inside `src` (each source folder brings its own espnet, the team's its own
    encoders)."""
    for name in [n for n in sys.modules if n.split(".")[0] in ("espnet", "encoders", "e2e_vsr")]:
        del sys.modules[name]
    sys.path.insert(0, str(src))
    try:
        return importlib.import_module(module)
    finally:
        sys.path.remove(str(src))


def backbone_args(src: Path, kind: str) -> Namespace:
    """The older layout's (ViSpeR, Auto-AVSR v1.0.0) base settings, from its own config files."""
    import yaml
    conf = next(p for p in (src / "conf", src / "configs") if p.is_dir()) / "model"
    args = yaml.safe_load((conf / "visual_backbone/resnet_conformer.yaml").read_text())
    if kind != "video":
        name = "audio_backbone" if kind == "audio" else "audiovisual_backbone"
        args.update(yaml.safe_load((conf / name / "resnet_conformer.yaml").read_text()))
    for key, value in args.items():  # Hydra's ${model.x_backbone.adim} references, resolved as Hydra would
        if isinstance(value, str) and value.startswith("${"):
            args[key] = args[value.strip("${}").split(".")[-1]]
    return Namespace(**args)


class Upstream:
    """One upstream model and how to run its parts on one clip: (video B x T x 1 x H x W, audio B x S x 1)."""

    def __init__(self, src: Path, modality: str):
        self.modality, self.today = modality, (src / "espnet/nets/pytorch_backend/frontend").is_dir()
        if self.today:  # Auto-AVSR since 2025: E2E(odim, modality), frontend and proj_encoder beside the encoder
            if modality == "av":
                raise LookupError("no audio-visual model in this layout (Auto-AVSR's is in its tag v1.0.0)")
            self.model = import_upstream(src, "espnet.nets.pytorch_backend.e2e_asr_conformer").E2E(V, modality)
        else:
            name = "e2e_asr_conformer_av" if modality == "av" else "e2e_asr_conformer"
            if not (src / f"espnet/nets/pytorch_backend/{name}.py").is_file():
                raise LookupError(f"no {name}.py")
            args = backbone_args(src, modality)
            if modality == "audio" and args.transformer_input_layer != "conv1d":
                args.transformer_input_layer = "conv1d"
            self.model = import_upstream(src, f"espnet.nets.pytorch_backend.{name}").E2E(V, args)
        self.mask = import_upstream(src, "espnet.nets.pytorch_backend.transformer.mask").target_mask

    def frontend(self, x):
        model = self.model
        return model.frontend(x) if self.today else model.encoder.frontend(x)

    def encode(self, video, audio):
        model = self.model
        if self.today:
            x = model.frontend(video if self.modality == "video" else audio)
            return model.encoder(model.proj_encoder(x), None)[0]
        if self.modality == "audio":
            return model.encoder(audio, None)[0]
        seen = model.encoder(video, None)[0]
        if self.modality == "video":
            return seen
        return model.fusion(torch.cat([seen, model.aux_encoder(audio, None)[0]], dim=-1))

    def decode(self, ys_in, enc):
        return self.model.decoder(ys_in, self.mask(ys_in, -1), enc, None)[0]


def randomise_batchnorm(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=g))
            module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=g))


def gap(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def compare(src: Path, modality: str, folder: Path) -> dict[str, float]:
    torch.manual_seed(0)
    upstream = Upstream(src, modality)
    randomise_batchnorm(upstream.model)
    upstream.model.eval()
    path = folder / f"{modality}.pth"
    torch.save(upstream.model.state_dict(), path)
    cfg = m.Config(preset="base", modality=modality, init_from=str(path), work_dir=str(folder / "run"))
    ours = m.build_model(cfg, V).eval()
    report = m.load_pretrained(ours, cfg)["init_from"]
    if report["skipped"] or report["missing"]:
        raise SystemExit(f"{src} {modality}: not every weight loaded: {report['skipped']} {report['missing']}")
    lengths, T = torch.tensor(LENGTHS), max(LENGTHS)
    real = m.padding_mask(lengths, T)  # padded with zeros, as the script's batches are
    video = torch.randn(len(LENGTHS), T, 88, 88) * real[:, :, None, None]
    audio = torch.randn(len(LENGTHS), T * m.SAMPLES_PER_FRAME) * real.repeat_interleave(m.SAMPLES_PER_FRAME, 1)
    ys_in = torch.randint(1, V - 1, (len(LENGTHS), 6))
    ys_in[:, 0] = V - 1  # sos
    inputs = {"video": video, "audio": audio, "av": (video, audio)}[modality]
    gaps = {"frontend": 0.0, "encoder": 0.0, "ctc": 0.0, "decoder": 0.0}
    with torch.no_grad():
        enc, mask = ours.encode(inputs, lengths)
        ctc, dec = ours.ctc(enc), ours.decoder(ys_in, enc, mask)
        front = ours.frontend(audio, lengths) if modality == "audio" else ours.frontend(video)
        for b, n in enumerate(LENGTHS):
            clip_video, clip_audio = video[b:b + 1, :n, None], audio[b:b + 1, :n * m.SAMPLES_PER_FRAME, None]
            their_front = upstream.frontend(clip_audio if modality == "audio" else clip_video)
            their_enc = upstream.encode(clip_video, clip_audio)
            steps = {"frontend": (front[b, :n], their_front[0]), "encoder": (enc[b, :n], their_enc[0]),
                     "ctc": (ctc[b, :n], upstream.model.ctc.ctc_lo(their_enc)[0]),
                     "decoder": (dec[b], upstream.decode(ys_in[b:b + 1], their_enc)[0])}
            for name, (a, theirs) in steps.items():
                gaps[name] = max(gaps[name], gap(a, theirs))
    return gaps


def team_settings(src: Path) -> tuple[dict, dict]:
    """The team backend's model settings and its two token lists, read from its source (not run: its imports
    need OpenCV, gdown and a face detector)."""
    tree = ast.parse((src / "backend/video_processor.py").read_text(encoding="utf-8"))
    assigned = [(t.id, node.value) for node in ast.walk(tree) if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Name)]
    configs = next(ast.literal_eval(v) for name, v in assigned if name == "MODEL_CONFIGS")
    dia, nodia = [ast.literal_eval(v) for name, v in assigned if name == "tokens"][:2]
    return configs, {"diacritized": dia, "letters": nodia}


def team_model(src: Path, encoder: str, tokens: list[str]):
    """Their E2EVSR as their backend's load_model builds it (decoder 768/12/3072/6, no frontend dropout)."""
    configs, _ = team_settings(src)
    config = configs[encoder]
    kind = config["encoder_type"]
    options = {**config["enc_options"], "hidden_dim": config["enc_options"][f"{kind}_options"]["hidden_dim"],
               "frontend3d_dropout_rate": 0.0, "resnet_dropout_rate": 0.0}
    decoder = dict(attention_dim=768, attention_heads=12, linear_units=3072, num_blocks=6, dropout_rate=0.1,
                   positional_dropout_rate=0.1, self_attention_dropout_rate=0.1, src_attention_dropout_rate=0.1,
                   normalize_before=True)
    E2EVSR = import_upstream(src / "model", "e2e_vsr").E2EVSR
    V = len(tokens)
    return E2EVSR(encoder_type=kind, vocab_size=V, token_list=tokens, sos=V - 2, eos=V - 1, pad=0,
                  enc_options=options, dec_options=decoder, ctc_weight=0.5, label_smoothing=0.1)


def fit_team(theirs, video, lengths, units: int, steps: int) -> None:
    """Their model fitted by its own loss to one random label a clip for `steps` Adam steps, so that the searches
    meet a model that prefers some hypotheses clearly, as a trained one does (untrained, nearly every score ties,
    and their decoder proposes `<sos>` as a unit, which this vocabulary has no place for)."""
    g = torch.Generator().manual_seed(1)
    labels = [torch.randint(1, units, (int(torch.randint(4, 9, (1,), generator=g)),), generator=g) for _ in lengths]
    optimizer = torch.optim.Adam(theirs.parameters(), lr=1e-4)
    theirs.train()
    for _ in range(steps):
        loss = theirs(video[:, None], lengths, torch.cat(labels), torch.tensor([len(t) for t in labels]))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    theirs.eval()


def compare_team(src: Path, encoder: str, units: str, folder: Path, fit_steps: int) -> dict:
    """Their model against ours, part by part (their token order mapped to this vocabulary's), and the searches."""
    import logging
    logging.disable(logging.INFO)  # their frontend logs every shape
    torch.manual_seed(0)
    tokens = team_settings(src)[1][units]
    theirs = team_model(src, encoder, tokens)
    randomise_batchnorm(theirs)
    lengths, T = torch.tensor(LENGTHS), max(LENGTHS)
    video = torch.randn(len(LENGTHS), T, 88, 88) * m.padding_mask(lengths, T)[:, :, None, None]
    fit_team(theirs, video, lengths, len(tokens) - 3, fit_steps)
    path = folder / f"team_{encoder}_{units}.pth"
    torch.save(theirs.state_dict(), path)
    cfg = m.Config(preset="base", encoder=encoder, units=units, init_from=str(path), work_dir=str(folder / "run"))
    vocab = m.load_vocabulary(cfg)
    ours = m.build_model(cfg, vocab.size).eval()
    report = m.load_pretrained(ours, cfg, vocab)["init_from"]
    if report["skipped"] or report["missing"]:
        raise SystemExit(f"{src} {encoder}: not every weight loaded: {report['skipped']} {report['missing']}")
    if m.team_tokens(vocab) != tokens:
        raise SystemExit(f"{src}: its {units} tokens are not the ones this script derives from its vocabulary")
    predicts = torch.tensor([vocab.ids.get(t, {"": 0, " ": vocab.specials["<space>"], "<sos>": vocab.specials["<unk>"],
                                                "<eos>": vocab.sos_eos}.get(t)) for t in tokens])
    units_in = torch.randint(1, len(tokens) - 3, (len(LENGTHS), 5))  # unit ids: the same in both orders
    ours_in = torch.cat([torch.full((len(LENGTHS), 1), vocab.sos_eos), units_in], 1)
    theirs_in = torch.cat([torch.full((len(LENGTHS), 1), len(tokens) - 2), units_in], 1)
    mask = import_upstream(src / "model", "espnet.transformer.mask")
    pad_mask = import_upstream(src / "model", "espnet.nets_utils").make_non_pad_mask
    gaps = {"frontend": 0.0, "encoder": 0.0, "ctc": 0.0, "decoder": 0.0}
    with torch.no_grad():
        enc, enc_mask = ours.encode(video, lengths)
        ctc, dec = ours.ctc(enc)[..., predicts], ours.decoder(ours_in, enc, enc_mask)[..., predicts]
        front = ours.frontend(video)
        for b, n in enumerate(LENGTHS):
            clip = video[b:b + 1, :n][:, None]  # 1 x 1 x T x H x W, as theirs reads
            their_front = theirs.frontend(clip)
            projected = theirs.proj_encoder(their_front)
            their_enc = (theirs.encoder(projected, pad_mask(torch.tensor([n])).unsqueeze(-2))[0]
                         if encoder == "conformer" else theirs.encoder(projected, torch.tensor([n]), 1))
            their_dec = theirs.decoder(theirs_in[b:b + 1], mask.subsequent_mask(6).unsqueeze(0), their_enc, None)[0]
            steps = {"frontend": (front[b, :n], their_front[0]), "encoder": (enc[b, :n], their_enc[0]),
                     "ctc": (ctc[b, :n], theirs.ctc.ctc_lo(their_enc)[0]), "decoder": (dec[b], their_dec[0])}
            for name, (a, t) in steps.items():
                gaps[name] = max(gaps[name], gap(a, t))
        back = {int(o): i for i, o in enumerate(predicts)}
        same = batched_apart = 0
        seconds = {"ours": 0.0, "theirs": 0.0}
        for weight in (0.3, 1.0):
            began = time.perf_counter()
            found = m.beam_search_batch(ours, enc, enc_mask, lengths, vocab,
                                        m.Config(preset="base", beam_size=10, beam_ctc_weight=weight))
            seconds["ours"] += time.perf_counter() - began
            began = time.perf_counter()
            alone = [theirs.beam_search(video[b:b + 1, :n][:, None], lengths[b:b + 1], beam_size=10,
                                        ctc_weight=weight)[0] for b, n in enumerate(LENGTHS)]  # as their backend
            seconds["theirs"] += time.perf_counter() - began
            batched = theirs.beam_search(video[:, None], lengths, beam_size=10, ctc_weight=weight)
            same += sum([back[t] for t in hyps[0][0]] == best for hyps, best in zip(found, alone))
            batched_apart += sum(a != b for a, b in zip(alone, batched))
        gaps["searches"] = (same, 2 * len(LENGTHS), batched_apart, seconds["theirs"] / seconds["ours"])
    return gaps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", type=Path, help="folders of Auto-AVSR's or ViSpeR's source")
    parser.add_argument("--modalities", default="video,audio,av")
    parser.add_argument("--fit-steps", type=int, default=30,
                        help="Adam steps fitting the team's models to a label a clip before the searches meet")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    worst, ok = 0.0, True
    print(f"base model, V = {V}, a padded batch of clips of {', '.join(map(str, LENGTHS))} frames, each against "
          "its lone upstream forward; largest relative gap")
    print(f"{'source':<28} {'modality':<8} {'frontend':>10} {'encoder':>10} {'ctc':>10} {'decoder':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for src in args.sources:
            if (src / "model/e2e_vsr.py").is_file():  # the team's: three encoders, two token sets, video
                for encoder in ("conformer", "mstcn", "dctcn"):
                    for units in ("diacritized", "letters"):
                        gaps = compare_team(src, encoder, units, Path(tmp), args.fit_steps)
                        same, clips, batched_apart, ratio = gaps.pop("searches")
                        worst = max(worst, *gaps.values())
                        ok &= same == clips
                        print(f"{str(src):<28} {encoder + ' ' + units:<8} " + " ".join(f"{g:>10.1e}" for g in
                                                                                  gaps.values())
                              + f"  beam 10, CTC 0.3 and 1.0: the same best hypothesis on {same}/{clips} clips "
                                f"(their search clip by clip, {ratio:.0f}x our time; their own batched search "
                                f"differs from it on {batched_apart})")
                continue
            for modality in args.modalities.split(","):
                try:
                    gaps = compare(src, modality, Path(tmp))
                except LookupError as e:
                    print(f"{str(src):<28} {modality:<8} skipped: {e}")
                    continue
                worst = max(worst, *gaps.values())
                print(f"{str(src):<28} {modality:<8} " + " ".join(f"{g:>10.1e}" for g in gaps.values()))
    print(f"largest gap {worst:.1e}: {'within' if worst < TOLERANCE else 'NOT within'} {TOLERANCE:g}"
          + ("" if ok else "; the searches differ on some clips"))
    return 0 if worst < TOLERANCE and ok else 1


if __name__ == "__main__":
    sys.exit(main())
