"""`blip2 chat`: a conversation about an image in the terminal."""

from __future__ import annotations

import sys

from ..inputs.images import ImageError, load_image


def chat_loop(model, image, settings: dict, report) -> int:
    """Talk about `image` on stdin and stdout until end of input: /reset clears the conversation,
    /image PATH changes the image. A line that cannot be used is reported (report(message)) and the
    talk goes on."""
    interactive = sys.stdin.isatty()
    if interactive:
        print("Ask about the image. /reset clears the conversation, /image PATH changes the image, "
              "Ctrl-D leaves.", file=sys.stderr)
    messages: list[dict] = []
    if hasattr(sys.stdin, "reconfigure"):  # undecodable bytes spoil their own line, not the stream
        sys.stdin.reconfigure(errors="surrogateescape")
    while True:
        try:
            line = input("you> " if interactive else "").strip()
        except EOFError:
            if interactive:
                print(file=sys.stderr)
            return 0
        if not line:
            continue
        if not _is_utf8(line):
            report("that line is not valid UTF-8 text; the conversation goes on without it")
            continue
        if line == "/reset":
            messages = []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if line.startswith("/image"):
            try:
                image = load_image(line[len("/image"):].strip())
                messages = []
                print("(new image; conversation cleared)", file=sys.stderr)
            except ImageError as e:
                report(str(e))
            continue
        messages.append({"role": "user", "content": line})
        try:
            reply = model.chat(image, messages, **settings)
        except (ValueError, RuntimeError) as e:  # a bad turn (its text, its length) is that turn's error
            report(str(e))
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": reply})
        print(f"blip2> {reply}" if interactive else reply, flush=True)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False
