"""``qa-app``: chat, ask, build-index, eval and train-ranker."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, fields
from pathlib import Path

from qa_app.config import Settings

log = logging.getLogger("qa_app")


def _engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kb", type=Path, help="one NPC's knowledge-base file (JSONL)")
    parser.add_argument("--kb-dir", type=Path, help="folder of knowledge bases, one NPC per file")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--threshold", type=float, help="accept answers with confidence >= this")
    parser.add_argument("--index-kind", choices=["flat", "ivf", "hnsw"], help="faiss index (flat is exact)")
    parser.add_argument("--rank-k", type=int, help="entries the ranker reads per question")
    parser.add_argument("--speech-encoder", help="speech model: shipped name, folder, or wav2vec2 checkpoint")
    parser.add_argument("--speech-mode", choices=["vectoriser", "asr"],
                        help="spoken questions: wav2vec2 vectoriser (default) or whisper + text path (asr extra)")


def _server_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", metavar="HOST:PORT", help="ask a running qa-app server instead")
    parser.add_argument("--token", help="bearer token for a server that requires one")
    parser.add_argument("--tls-ca", help="PEM CA certificate to verify a TLS server")


def _train_args(parser: argparse.ArgumentParser, config_name: str) -> None:
    """Flags every trainer takes; they override the --config file (see _train_config)."""
    parser.add_argument("--config", help=f"JSON file of {config_name} fields")
    parser.add_argument("--output", help="folder to write the model to")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--epochs", type=int)


def _make_engine(args):
    from qa_app.engine import QAEngine

    settings = Settings.from_env(kb_dir=args.kb_dir, device=args.device, threshold=args.threshold,
                                 index_kind=args.index_kind, rank_k=args.rank_k,
                                 speech_encoder=getattr(args, "speech_encoder", None),
                                 speech_mode=getattr(args, "speech_mode", None))
    if args.kb:
        return QAEngine.from_kb_file(args.kb, settings=settings)
    return QAEngine(settings=settings)


def _pick_npc(engine, npc: str | None) -> str:
    from qa_app.engine import UnknownNpcError

    if npc is None:
        return engine.npcs[0]
    if npc not in engine.npcs:
        raise UnknownNpcError(npc, engine.npcs)
    return npc


def answer_json(answer) -> dict:
    data = asdict(answer)
    data["entities"] = [{"name": m.name, "text": m.text, "score": round(m.score, 1), "entry_ids": list(m.entry_ids)}
                        for m in answer.entities]
    data["timings_ms"] = {k: round(v, 2) for k, v in answer.timings_ms.items()}
    return data


def format_answer(answer) -> str:
    lines = []
    if answer.rejected:
        lines.append(f"[no answer] I don't know that one. (confidence {answer.confidence:.2f})")
    else:
        lines.append(f"{answer.answer}")
        lines.append(f"  entry {answer.id}, confidence {answer.confidence:.2f}")
    if answer.normalized_query:
        lines.append(f"  understood: {answer.normalized_query}")
    if answer.entities:
        lines.append("  entities: " + ", ".join(f"{m.name} ({m.text!r})" for m in answer.entities))
    lines.append("  timing ms: " + " ".join(f"{k}={v:.1f}" for k, v in answer.timings_ms.items()))
    for warning in answer.warnings:
        lines.append(f"  warning: {warning}")
    return "\n".join(lines)


def _remote(args):
    from qa_app.client import NpcClient

    return NpcClient(args.server, token=args.token, tls_ca=args.tls_ca)


def format_remote_answer(answer) -> str:
    head = "[no answer] I don't know that one." if answer.rejected else answer.text
    timing = " ".join(f"{k}={v:.1f}" for k, v in answer.timings_ms.items())
    return f"{head}\n  entry {answer.id or '-'}, confidence {answer.confidence:.2f}\n  timing ms (server): {timing}"


def cmd_ask(args) -> int:
    if args.server:
        from google.protobuf.json_format import MessageToJson

        with _remote(args) as client:
            answer = client.ask(args.npc or "quartermaster", args.question)
        print(MessageToJson(answer) if args.json else format_remote_answer(answer))
        return 0
    engine = _make_engine(args)
    answer = engine.ask(_pick_npc(engine, args.npc), args.question)
    print(json.dumps(answer_json(answer), indent=2) if args.json else format_answer(answer))
    return 0


def cmd_chat(args) -> int:
    from qa_app.engine import QueryError

    if args.server:
        return _chat_remote(args)
    engine = _make_engine(args)
    npc = _pick_npc(engine, args.npc)

    def answer(text: str) -> str:
        try:
            return format_answer(engine.ask(npc, text))
        except QueryError as err:
            return f"  {err}"

    return _chat_loop(f"Talking to {npc} ({len(engine.knowledge_base(npc))} entries).", answer)


def _chat_loop(header: str, answer) -> int:
    """Read questions until Ctrl-D or Ctrl-C; print what `answer(text)` returns for each."""
    print(f"{header} Ctrl-D or Ctrl-C to leave.")
    while True:
        try:
            text = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if text.strip():
            print(answer(text))


def _chat_remote(args) -> int:
    import grpc

    with _remote(args) as client:
        npc = args.npc or client.list_npcs()[0].name

        def answer(text: str) -> str:
            try:
                return format_remote_answer(client.ask(npc, text))
            except grpc.RpcError as err:
                return f"  server: {err.code().name}: {err.details()}"

        return _chat_loop(f"Talking to {npc} at {args.server}.", answer)


def cmd_serve(args) -> int:
    import asyncio

    from qa_app.server.service import serve, serve_processes

    logging.getLogger("qa_app").setLevel(logging.INFO)
    settings = Settings.from_env(kb_dir=args.kb_dir, device=args.device, host=args.host, port=args.port,
                                 workers=args.workers, max_queue=args.max_queue, max_batch_size=args.max_batch_size,
                                 max_queue_delay_ms=args.max_queue_delay_ms, max_batch_tokens=args.max_batch_tokens,
                                 max_batch_audio_s=args.max_batch_audio_s, auth_token=args.token,
                                 tls_cert=args.tls_cert, tls_key=args.tls_key, metrics_port=args.metrics_port,
                                 speech_encoder=args.speech_encoder, speech_mode=args.speech_mode)
    if args.processes != 1:
        try:
            return serve_processes(settings, args.processes)
        except ValueError as err:
            print(f"qa-app: error: {err}", file=sys.stderr)
            return 2
    asyncio.run(serve(settings))
    return 0


def cmd_loadtest(args) -> int:
    import asyncio

    from qa_app.kb import load_queries
    from qa_app.loadtest import run_load
    from qa_app.models.loading import ASSETS_DIR

    if args.mode == "talk":
        from qa_app.loadtest import load_spoken_questions

        path = args.queries or ASSETS_DIR / "eval" / "spoken" / "innkeeper.jsonl"
        queries = load_spoken_questions(path)
    else:
        path = args.queries or ASSETS_DIR / "eval" / "quartermaster.jsonl"
        queries = load_queries(path)
    report = asyncio.run(run_load(args.server, args.npc or Path(path).stem, queries, args.players, args.duration,
                                  args.rate, args.mode, args.token, args.tls_ca))
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{report['players']} players, {report['mode']} calls, {report['duration_s']:.1f} s: "
          f"{report['requests']} requests, {report['qps']:.1f} answers/s")
    print(f"latency ms  p50 {report['p50_ms']:.1f}  p90 {report['p90_ms']:.1f}  p99 {report['p99_ms']:.1f}  "
          f"max {report['max_ms']:.1f}")
    print(f"errors {report['errors'] or 'none'}")
    print(f"accuracy {report['accuracy']:.3f}  answered_correctly {report['answered_correctly']:.3f}  "
          f"false_accept_rate {report['false_accept_rate']:.3f}")
    return 0


def cmd_build_index(args) -> int:
    from qa_app.engine import NpcIndex
    from qa_app.kb import load_kb
    from qa_app.models.text_encoder import TextEncoder

    settings = Settings.from_env(device=args.device, index_kind=args.index_kind)
    kb = load_kb(args.kb)
    encoder = TextEncoder(settings.text_encoder, settings.device)
    index = NpcIndex(kb, encoder, settings.index_kind, spelling=False)
    path = index.save(encoder, settings.index_kind)
    print(f"{kb.npc}: {len(kb)} entries, {len(index.questions)} questions -> {path}")
    return 0


def cmd_eval(args) -> int:
    from qa_app.evaluate import evaluate, evaluate_baseline
    from qa_app.kb import load_queries

    if not args.kb:
        raise SystemExit("qa-app eval: --kb is required")
    if bool(args.queries) == bool(args.speech_manifest):
        raise SystemExit("qa-app eval: give either --queries (typed) or --speech-manifest (spoken)")
    engine = _make_engine(args)
    npc = engine.npcs[0]
    if args.speech_manifest:
        return _print_speech_eval(engine, npc, args)
    queries = load_queries(args.queries)
    metrics = evaluate(engine, npc, queries)
    if args.baseline:
        metrics["baseline"] = evaluate_baseline(engine, npc, queries)
    if args.json:
        print(json.dumps(metrics))
        return 0
    rows = ["in_scope_top1", "answered_correctly", "false_accept_rate", "false_reject_rate", "auroc",
            "typo_top1", "typo_clean_top1", "latency_p50_ms", "latency_p99_ms"]
    print(f"NPC {npc}: {metrics['queries']} queries ({metrics['in_scope']} in scope, "
          f"{metrics['must_reject']} must be rejected), threshold {metrics['threshold']:.3f}")
    header = f"{'metric':<22}{'pipeline':>10}" + (f"{'baseline':>10}" if args.baseline else "")
    print(header)
    for key in rows:
        if key not in metrics:
            continue
        line = f"{key:<22}{metrics[key]:>10.3f}"
        if args.baseline and key in metrics["baseline"]:
            line += f"{metrics['baseline'][key]:>10.3f}"
        print(line)
    at_far = metrics["at_10pct_far"]
    line = f"{'answered@10%FAR':<22}{at_far['answered_correctly']:>10.3f}"
    if args.baseline:
        line += f"{metrics['baseline']['answered_correctly']:>10.3f}"
    print(line + "   (threshold set for 10% false accepts on this set, both columns)")
    print("per kind (accepted-and-correct for answerable kinds, rejected for the others):")
    for kind, value in metrics["per_kind_accuracy"].items():
        base = metrics["baseline"]["per_kind_accuracy"].get(kind) if args.baseline else None
        print(f"  {kind:<20}{value:>10.3f}" + (f"{base:>10.3f}" if base is not None else ""))
    if args.baseline:
        print(f"baseline: plain bi-encoder cosine, {metrics['baseline']['threshold_rule']}")
    return 0


def _train_config(args, config_class) -> dict:
    """A training config: the --config JSON file, then the flags given on the command line."""
    values = json.loads(Path(args.config).read_text()) if args.config else {}
    values.update({f.name: getattr(args, f.name) for f in fields(config_class)
                   if getattr(args, f.name, None) is not None})
    return values


def _print_speech_eval(engine, npc: str, args) -> int:
    from qa_app.evaluate import evaluate_speech

    metrics = evaluate_speech(engine, npc, str(args.speech_manifest),
                              asr_baseline=args.whisper_model if args.speech_baseline == "asr" else None)
    if args.json:
        print(json.dumps(metrics))
        return 0
    asr = metrics.get("asr_baseline")
    print(f"NPC {npc}: {metrics['queries']} spoken questions ({metrics['in_scope']} in scope, "
          f"{metrics['must_reject']} must be rejected), threshold {metrics['threshold']:.3f}")
    header = f"{'metric':<26}{'speech path':>12}"
    if asr:
        header += f"{'ASR+text path':>15}{'ASR+bi-encoder':>16}"
    print(header)
    for key in ("in_scope_top1", "answered_correctly", "false_accept_rate", "false_reject_rate", "auroc"):
        line = f"{key:<26}{metrics[key]:>12.3f}"
        if asr:
            line += f"{asr['text_path'][key]:>15.3f}{asr['bi_encoder'][key]:>16.3f}"
        print(line)
    line = f"{'answered@10%FAR':<26}{metrics['at_10pct_far']['answered_correctly']:>12.3f}"
    if asr:
        line += f"{asr['text_path']['at_10pct_far']['answered_correctly']:>15.3f}{asr['bi_encoder']['answered_correctly']:>16.3f}"
    print(line + "   (threshold for 10% false accepts on this set)")
    if "transcript_wer" in metrics:
        line = f"{'word error rate':<26}{metrics['transcript_wer']:>12.3f}"
        print(line + (f"{asr['wer']:>15.3f}" if asr and "wer" in asr else ""))
    line = f"{'ms per utterance':<26}{metrics['latency_ms_per_utterance']:>12.1f}"
    print(line + (f"{asr['asr_ms_per_utterance']:>15.1f}   (ASR alone)" if asr else ""))
    if "text_cosine" in metrics:
        c = metrics["text_cosine"]
        print(f"speech vector . text vector of what was said: p10 {c['p10']:.3f}  median {c['median']:.3f}  "
              f"p90 {c['p90']:.3f}")
    if asr:
        print(f"baselines: {asr['model']} transcripts, answered by our text path / by plain bi-encoder cosine "
              f"({asr['bi_encoder']['threshold_rule']})")
    return 0


def cmd_train_speech(args) -> int:
    from qa_app.train.speech import SpeechTrainConfig, train_speech

    report = train_speech(SpeechTrainConfig(**_train_config(args, SpeechTrainConfig)))
    print(json.dumps({k: report[k] for k in ("utterances", "hours", "voices", "steps", "held_out_voices",
                                             "minutes")}, indent=2))
    return 0


def cmd_calibrate_speech(args) -> int:
    from qa_app.train.speech import calibrate_speech

    report = calibrate_speech([str(m) for m in args.manifest], args.speech_encoder, args.target_false_accept,
                              device=args.device or "auto")
    print(json.dumps(report, indent=2))
    return 0


def cmd_synth_speech(args) -> int:
    from qa_app.train.speech_data import spoken_query_set

    manifest = spoken_query_set(args.queries, args.out, args.name, tuple(args.engines.split(",")), args.seed,
                                args.limit)
    print(manifest)
    return 0


def cmd_train_ranker(args) -> int:
    from qa_app.train.ranker import RankerTrainConfig, train_ranker

    report = train_ranker(RankerTrainConfig(**_train_config(args, RankerTrainConfig)))
    print(json.dumps({k: report.get(k) for k in ("training_groups", "threshold", "held_out", "minutes")}, indent=2))
    return 0


def cmd_distill(args) -> int:
    from qa_app.train.distill import RankerDistillConfig, SpeechDistillConfig, distill_ranker, distill_speech

    if args.model == "ranker":
        report = distill_ranker(RankerDistillConfig(**_train_config(args, RankerDistillConfig)))
    else:
        report = distill_speech(SpeechDistillConfig(**_train_config(args, SpeechDistillConfig)))
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))
    return 0


def cmd_train_encoder(args) -> int:
    from qa_app.train.encoder import EncoderTrainConfig, train_encoder

    report = train_encoder(EncoderTrainConfig(**_train_config(args, EncoderTrainConfig)))
    print(json.dumps({k: report[k] for k in ("pairs", "recall_top1", "minutes")}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qa-app", description="Question answering for game NPCs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and stage details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("chat", help="talk to an NPC in the terminal")
    _engine_args(p)
    _server_args(p)
    p.add_argument("--npc", help="NPC name (a KB file stem); default: the first")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("ask", help="ask one question")
    _engine_args(p)
    _server_args(p)
    p.add_argument("--npc", help="NPC name (a KB file stem); default: the first")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    p.add_argument("question")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("serve", help="run the gRPC service (Ctrl-C or SIGTERM drains and stops it)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, help="port (default 50051; 0 picks a free one)")
    p.add_argument("--kb-dir", type=Path, help="folder of knowledge bases, one NPC per file")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, help="threads for the CPU stages (default: one per core)")
    p.add_argument("--processes", type=int, default=1,
                   help="server processes sharing the port, each with its own engine and batchers (default 1; "
                        "more spread the Python work over cores; metrics on --metrics-port + i)")
    p.add_argument("--max-queue", type=int, help="requests in flight before RESOURCE_EXHAUSTED")
    p.add_argument("--max-batch-size", type=int, help="requests per model call (1 turns batching off)")
    p.add_argument("--max-queue-delay-ms", type=float, help="longest wait for others to share a batch")
    p.add_argument("--max-batch-tokens", type=int, help="padded tokens per text-encoder or ranker call")
    p.add_argument("--max-batch-audio-s", type=float, help="padded seconds of audio per speech-encoder call")
    p.add_argument("--token", help="require 'authorization: Bearer TOKEN' on every call (or QA_AUTH_TOKEN)")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve TLS")
    p.add_argument("--tls-key", type=Path, help="PEM private key for --tls-cert")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics over HTTP on this port")
    p.add_argument("--speech-encoder", help="speech model for Talk: shipped name, folder, or wav2vec2 checkpoint")
    p.add_argument("--speech-mode", choices=["vectoriser", "asr"],
                   help="Talk answers via the wav2vec2 vectoriser (default) or whisper + text path (asr extra)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("loadtest", help="simulate many players against a running server")
    p.add_argument("--server", metavar="HOST:PORT", required=True)
    p.add_argument("--players", type=int, default=16)
    p.add_argument("--duration", type=float, default=30.0, help="seconds")
    p.add_argument("--rate", type=float, default=0.0, help="questions per second per player (0: back to back)")
    p.add_argument("--queries", type=Path, help="labelled query file, or for --mode talk a spoken manifest "
                   "(default: the bundled quartermaster set; spoken innkeeper set)")
    p.add_argument("--npc", help="NPC to ask (default: the query file's stem)")
    p.add_argument("--mode", choices=["ask", "chat", "talk"], default="ask",
                   help="unary calls, one Chat stream per player, or one real-time voice stream per player")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--token", help="bearer token for a server that requires one")
    p.add_argument("--tls-ca", help="PEM CA certificate to verify a TLS server")
    p.set_defaults(func=cmd_loadtest)

    p = sub.add_parser("build-index", help="build and save a KB's faiss index beside it")
    p.add_argument("--kb", type=Path, required=True)
    p.add_argument("--device")
    p.add_argument("--index-kind", choices=["flat", "ivf", "hnsw"])
    p.set_defaults(func=cmd_build_index)

    p = sub.add_parser("eval", help="score the engine on a labelled query set")
    _engine_args(p)
    p.add_argument("--queries", type=Path, help="JSONL of {query, expected_id, kind}")
    p.add_argument("--speech-manifest", type=Path, help="JSONL of {audio, expected_id}: spoken questions")
    p.add_argument("--speech-baseline", choices=["asr"],
                   help="with --speech-manifest: also score whisper transcripts (needs the asr extra)")
    p.add_argument("--whisper-model", default="whisper-base",
                   help="whisper for --speech-baseline: whisper-base (bundled) or a CTranslate2 folder")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--baseline", action="store_true", help="also score plain bi-encoder cosine")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("train-ranker", help="train and calibrate the cross-encoder ranker")
    _train_args(p, "RankerTrainConfig")
    p.add_argument("--limit-groups", dest="limit_groups", type=int, help="train on N groups (smoke test)")
    p.add_argument("--calibrate-only", dest="calibrate_only", action="store_true", default=None,
                   help="keep the trained model at --output; refit fusion, rejector and threshold")
    p.add_argument("--target-false-accept", dest="target_false_accept", type=float,
                   help="false-accept rate the threshold is set for on the calibration game")
    p.set_defaults(func=cmd_train_ranker)

    p = sub.add_parser("distill", help="distil a model into a student with fewer layers (TinyBERT losses)")
    p.add_argument("model", choices=("ranker", "speech"), help="which model to compress")
    _train_args(p, "RankerDistillConfig or SpeechDistillConfig")
    p.add_argument("--teacher", help="the model to distil (shipped name or folder)")
    p.add_argument("--layers", type=int, help="student transformer layers")
    p.add_argument("--layer-map", dest="layer_map",
                   help="teacher layer (1-based) each student layer learns from, e.g. 2,4,6 (default: uniform)")
    p.add_argument("--conv-dim", dest="conv_dim", type=int, help="speech: channels of the student's conv front end")
    p.add_argument("--steps", type=int, help="optimisation steps (ranker: at most; 0 = all --epochs)")
    p.add_argument("--max-train-minutes", dest="max_train_minutes", type=float,
                   help="fewer steps if the measured speed would overrun this")
    p.add_argument("--limit-groups", dest="limit_groups", type=int, help="ranker: this many groups (smoke test)")
    p.add_argument("--limit-texts", dest="limit_texts", type=int, help="speech: this many texts (smoke test)")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false", default=None,
                   help="ranker: skip fitting the rejector (calibrate later with train-ranker --calibrate-only)")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("train-encoder", help="adapt the bi-encoder to players' questions (contrastive)")
    _train_args(p, "EncoderTrainConfig")
    p.set_defaults(func=cmd_train_encoder)

    p = sub.add_parser("train-speech", help="train the wav2vec2 speech vectoriser on synthetic speech")
    _train_args(p, "SpeechTrainConfig")
    p.add_argument("--steps", type=int)
    p.add_argument("--limit-texts", dest="limit_texts", type=int, help="this many texts only (smoke test)")
    p.add_argument("--max-train-minutes", dest="max_train_minutes", type=float,
                   help="fewer steps if the measured speed would overrun this")
    p.set_defaults(func=cmd_train_speech)

    p = sub.add_parser("calibrate-speech", help="fit the speech path's rejector and threshold on spoken questions")
    p.add_argument("--manifest", type=Path, action="append", required=True,
                   help="a training game's queries read aloud, named GAME.jsonl (repeat for several games)")
    p.add_argument("--speech-encoder", default="speech-encoder", help="the speech model to calibrate (in place)")
    p.add_argument("--target-false-accept", type=float, default=0.10,
                   help="false-accept rate the threshold is set for on these questions")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(func=cmd_calibrate_speech)

    p = sub.add_parser("synth-speech", help="read a labelled query set aloud into an audio manifest")
    p.add_argument("--queries", type=Path, required=True, help="JSONL of {query, expected_id, kind}")
    p.add_argument("--out", type=Path, required=True, help="folder for the manifest and its audio")
    p.add_argument("--name", required=True, help="manifest name (NAME.jsonl and NAME/)")
    p.add_argument("--engines", default="flite,espeak-held-out",
                   help="comma list of flite, espeak-held-out, espeak, piper")
    p.add_argument("--limit", type=int, default=0, help="at most this many queries")
    p.add_argument("--seed", type=int, default=13)
    p.set_defaults(func=cmd_synth_speech)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from qa_app.engine import QueryError, UnknownNpcError
    from qa_app.kb import KnowledgeBaseError
    from qa_app.models.loading import ModelNotFoundError

    try:
        return args.func(args)
    except (KnowledgeBaseError, QueryError, UnknownNpcError, ModelNotFoundError, FileNotFoundError) as err:
        print(f"qa-app: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a server's refusal (grpc.RpcError) is reported, not dumped as a traceback
        import grpc

        if isinstance(err, grpc.RpcError):
            print(f"qa-app: server said {err.code().name}: {err.details()}", file=sys.stderr)
            return 2
        raise
