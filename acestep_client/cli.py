"""`acestep`: generate music, follow, download and cancel jobs of an ACE-Step server from the shell.

    acestep generate "upbeat synth pop" --lyrics-file song.txt --duration 30 -o song.mp3
    acestep status ID | acestep cancel ID | acestep download ID -o out/

Exit status: 0 done, 1 the server refused the request, the job failed or a file could not be read or written, 2 a
bad command line or request (found before anything was sent), 130 interrupted (the job keeps running on the server).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from acestep_client import envs
from acestep_client.client import Client
from acestep_client.errors import AceStepError, InvalidRequestError, JobFailedError, UnknownFieldError
from acestep_client.retry import RetryPolicy
from jobs.schemas import AUDIO_FORMATS, MP3_BITRATES, TASK_TYPES

# `-o song.<ext>` picks the format; wav32 shares .wav with wav, so only `--format wav32` asks for it.
EXTENSION_FORMATS = {fmt: fmt for fmt in AUDIO_FORMATS if fmt != "wav32"}
RETRY = RetryPolicy()  # network errors and 502/503/504: about 15 s of backoff before giving up


class UsageError(Exception):
    """A command line that cannot run: exit 2, nothing sent."""


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    client = Client(args.server, api_key=args.api_key, timeout=args.http_timeout, retry=RETRY)
    job_id = None
    try:
        if args.command == "generate":
            return _generate(client, args)
        job = client.job(args.job_id)
        job_id = job.id
        if args.command == "status":
            print(job.status().model_dump_json(indent=2))
        elif args.command == "cancel":
            print(f"{job.id} {job.cancel().status}")
        elif args.command == "download":
            job.wait(progress=not args.no_progress)
            _print_paths(job.download(args.output))
        return 0
    except (UsageError, InvalidRequestError, UnknownFieldError) as exc:
        print(f"acestep: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a lyrics or audio file that cannot be read, an output that cannot be written
        print(f"acestep: error: {exc}", file=sys.stderr)
        return 1
    except JobFailedError as exc:
        print(f"acestep: {exc}", file=sys.stderr)
        return 1
    except AceStepError as exc:
        print(f"acestep: error: {getattr(exc, 'detail', exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        job_id = getattr(args, "submitted", None) or job_id
        if job_id is None:
            print("\nacestep: interrupted", file=sys.stderr)
        else:
            print(f"\nacestep: interrupted; job {job_id} keeps running on the server (acestep status {job_id}, "
                  f"acestep download {job_id}, acestep cancel {job_id})", file=sys.stderr)
        return 130
    finally:
        client.close()


def _generate(client: Client, args: argparse.Namespace) -> int:
    directory, name, audio_format = _output_target(args.output, args.format)
    fields = _fields(args)
    if audio_format is not None:
        fields["audio_format"] = audio_format
    job = client.generate(src_audio=args.src_audio, reference_audio=args.reference_audio, **fields)
    args.submitted = job.id  # for the Ctrl-C message
    print(f"acestep: job {job.id} submitted", file=sys.stderr)
    if args.no_wait:
        print(job.id)
        return 0
    job.wait(progress=not args.no_progress, timeout=args.timeout)
    _print_paths(job.download(directory, name=name))
    return 0


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    """The request fields of the command line: the named options, then every `--param KEY=VALUE`."""
    fields: dict[str, Any] = {}
    if args.caption:
        fields["caption"] = args.caption
    if args.lyrics_file is not None:
        fields["lyrics"] = sys.stdin.read() if args.lyrics_file == "-" else Path(args.lyrics_file).read_text()
    elif args.lyrics is not None:
        fields["lyrics"] = args.lyrics
    if args.seed is not None:  # a seed given is a seed used
        fields.update(seed=args.seed, use_random_seed=False)
    for option, name in _NAMED_FIELDS.items():
        value = getattr(args, option)
        if value is not None:
            fields[name] = value
    for item in args.param:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--param {item!r}: expected KEY=VALUE")
        try:
            fields[key.strip()] = json.loads(text)  # numbers, booleans, lists, null
        except ValueError:
            fields[key.strip()] = text
    return fields


def _output_target(output: str | None, audio_format: str | None) -> tuple[Path, str | None, str | None]:
    """(directory, file name stem or None for the job id's, format) of `-o`: a directory (existing, or ending in
    a slash), or a file whose extension sets the format unless `--format` does."""
    if output is None:
        return Path("."), None, audio_format
    path = Path(output)
    if output.endswith(("/", os.sep)) or path.is_dir():
        return path, None, audio_format
    extension = path.suffix.lower().lstrip(".")
    if extension in EXTENSION_FORMATS:
        return path.parent, path.stem, audio_format or EXTENSION_FORMATS[extension]
    if extension and audio_format is None:
        raise UsageError(f"-o {output}: cannot tell the format from .{extension}; name a "
                         f"{', '.join('.' + e for e in EXTENSION_FORMATS)} file, or pass --format")
    return path.parent, path.name, audio_format


def _print_paths(paths: list[Path]) -> None:
    for path in paths:
        print(path)


# option dest -> request field, for the options that are one field each
_NAMED_FIELDS = {"duration": "audio_duration", "steps": "inference_steps", "batch_size": "batch_size",
                 "bpm": "bpm", "key": "key_scale", "time_signature": "time_signature", "language": "vocal_language",
                 "task": "task_type", "guidance_scale": "guidance_scale", "shift": "shift", "model": "model",
                 "lora": "lora", "lora_scale": "lora_scale", "bitrate": "mp3_bitrate", "instruction": "instruction",
                 "track_name": "track_name", "repaint_start": "repainting_start", "repaint_end": "repainting_end",
                 "cover_strength": "audio_cover_strength"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="acestep", description="Make music with an ACE-Step server.")
    # Accepted before or after the command; SUPPRESS keeps a subcommand from overwriting the top level's value.
    for target, default in ((parser, True), (common := argparse.ArgumentParser(add_help=False), False)):
        target.add_argument("--server", default=envs.acestep_server() if default else argparse.SUPPRESS,
                            help="base URL (default: $ACESTEP_SERVER or http://localhost:8001)")
        target.add_argument("--api-key", default=envs.acestep_api_key() if default else argparse.SUPPRESS,
                            help="API key (default: $ACESTEP_API_KEY)")
        target.add_argument("--http-timeout", type=float, default=30.0 if default else argparse.SUPPRESS,
                            help="seconds per HTTP request (default 30)")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", parents=[common], help="submit a job, follow it, download its audio")
    generate.add_argument("caption", nargs="?", default="", help="the music's description")
    lyrics = generate.add_mutually_exclusive_group()
    lyrics.add_argument("--lyrics", help="lyrics text")
    lyrics.add_argument("--lyrics-file", metavar="FILE", help="read the lyrics from FILE (- for stdin)")
    generate.add_argument("--duration", type=float, metavar="S", help="seconds of audio")
    generate.add_argument("--steps", type=int, metavar="N", help="diffusion steps (inference_steps)")
    generate.add_argument("--batch-size", type=int, metavar="N", help="outputs (the server's default: 2)")
    generate.add_argument("--seed", type=int, help="first seed (the outputs use seed, seed+1, ...)")
    generate.add_argument("--format", choices=AUDIO_FORMATS, help="audio format (default: -o's extension, or mp3)")
    generate.add_argument("--bitrate", type=int, choices=MP3_BITRATES, metavar="KBPS", help="constant mp3 bitrate")
    generate.add_argument("--bpm", type=int)
    generate.add_argument("--key", help='key and scale, e.g. "C Major"')
    generate.add_argument("--time-signature")
    generate.add_argument("--language", help="lyrics language code (vocal_language)")
    generate.add_argument("--task", choices=TASK_TYPES, help="task_type (default text2music)")
    generate.add_argument("--src-audio", metavar="FILE", help="source audio to upload (cover, repaint, ...)")
    generate.add_argument("--reference-audio", metavar="FILE", help="reference audio to upload (cover)")
    generate.add_argument("--repaint-start", type=float, metavar="S")
    generate.add_argument("--repaint-end", type=float, metavar="S")
    generate.add_argument("--cover-strength", type=float)
    generate.add_argument("--track-name")
    generate.add_argument("--instruction")
    generate.add_argument("--guidance-scale", type=float)
    generate.add_argument("--shift", type=float)
    generate.add_argument("--model", help="DiT model name (GET /v1/models)")
    generate.add_argument("--lora", help="LoRA adapter name")
    generate.add_argument("--lora-scale", type=float)
    generate.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                          help="any other request field (VALUE read as JSON where it parses); repeatable")
    generate.add_argument("-o", "--output", metavar="PATH", help=(
        "song.mp3 (song-1.mp3, song-2.mp3, ... for several outputs) or a directory (default: ., files named "
        "<job_id>-<n>.<ext>)"))
    generate.add_argument("--timeout", type=float, metavar="S", help="stop waiting after S seconds (the job goes on)")
    generate.add_argument("--no-wait", action="store_true", help="print the job id and exit")
    generate.add_argument("--no-progress", action="store_true", help="no progress bar")

    status = commands.add_parser("status", parents=[common], help="print a job's view as JSON")
    status.add_argument("job_id")
    cancel = commands.add_parser("cancel", parents=[common], help="cancel a queued or running job")
    cancel.add_argument("job_id")
    download = commands.add_parser("download", parents=[common], help="wait for a job and download its audio")
    download.add_argument("job_id")
    download.add_argument("-o", "--output", default=".", metavar="DIR", help="directory (default: .)")
    download.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


if __name__ == "__main__":
    sys.exit(main())
