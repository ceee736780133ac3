"""Images in conversations: where they come from, how they are checked, where the template puts them.

Accepted forms (both normalised to the same thing):
  OpenAI content parts  {"type": "image_url", "image_url": {"url": U}} (or "image_url": U), and
                        {"type": "image", "image": U}; the parts' order is kept: the image sits where its
                        part is among the text parts.
  ShareGPT              a record-level "images": [U, ...] list; each "<image>" tag in a message's text
                        takes the next image in order; without any tag, all images go at the start of the
                        first user message. More or fewer tags than images is an error.
U is a local path (relative paths are relative to the data file's folder), a file:// URI or a
data:image/...;base64 URI. Remote http(s) URLs are refused (nothing is downloaded during a run).

A normalised message keeps its text in "content" with IMAGE_MARK where each image sits, and the images'
references (absolute paths, or the data: URI itself) under "images". A chat template then writes its
target's image placeholder at each mark (`ChatTemplate.image_placeholder`); the engine expands each
placeholder to the number of tokens the target's processor gives the image (torchspec.inference.vlm).
Images are allowed in system, user and tool turns, never in assistant turns (they would be supervised).
Every image is opened at load time: a missing or unreadable one is one DataError naming file and line.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from pathlib import Path
from urllib.parse import unquote, urlparse

from torchspec.data.errors import DataError
from torchspec.utils.optional import install_hint

# A private-use character: where an image sits in a normalised message's text (never in real text: refused there).
IMAGE_MARK = "\ue000"
SHAREGPT_IMAGE_TAG = "<image>"


def image_part_url(part) -> str | None:
    """The image reference of an OpenAI-style content part, or None when the part is not an image."""
    if not isinstance(part, dict):
        return None
    kind = part.get("type")
    if kind == "image_url" or (kind is None and "image_url" in part):
        ref = part.get("image_url")
        return ref.get("url") if isinstance(ref, dict) else ref
    if kind == "image":
        ref = part.get("image", part.get("url"))
        return ref.get("url") if isinstance(ref, dict) else ref
    return None


def resolve_image(ref, base_dir: Path | None, loc: str, what: str) -> str:
    """A checked image reference: an absolute local path, or the data: URI itself. `what` names the message."""
    if not isinstance(ref, str) or not ref.strip():
        raise DataError(f"{loc}: {what} has an image with no url/path (got {ref!r})")
    if ref.startswith("data:"):
        _open(ref, loc, what)
        return ref
    parsed = urlparse(ref)
    if parsed.scheme in ("http", "https"):
        raise DataError(f"{loc}: {what} has a remote image {ref!r}; download it first and give its local path "
                        "(nothing is fetched during a run)")
    if parsed.scheme == "file":
        path = Path(unquote(parsed.path))
    elif parsed.scheme and len(parsed.scheme) > 1:   # "C:" style drive letters are paths, anything else is not
        raise DataError(f"{loc}: {what} has an image URL with scheme {parsed.scheme!r}; "
                        "expected a local path, file:// or data: URI")
    else:
        path = Path(os.path.expanduser(ref))
    if not path.is_absolute():
        path = (base_dir or Path.cwd()) / path
    if not path.is_file():
        raise DataError(f"{loc}: {what} has an image that does not exist: {str(path)!r}")
    _open(str(path), loc, what)
    return str(path.resolve())


def load_image(ref: str, where: str = ""):
    """The image `ref` (as resolve_image returns it) as an RGB PIL image; DataError when it cannot be read."""
    return _open(ref, where or "image", "it", convert=True)


def _open(ref: str, loc: str, what: str, convert: bool = False):
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:  # pragma: no cover - Pillow is a transformers image-processor dependency
        raise DataError(f"{loc}: {what} has an image, and reading images needs Pillow: "
                        f"{install_hint('multimodal')}") from None
    shown = ref if not ref.startswith("data:") else ref[:40] + "..."
    try:
        if ref.startswith("data:"):
            header, _, payload = ref.partition(",")
            if ";base64" not in header:
                raise DataError(f"{loc}: {what} has a data: URI that is not base64 ({shown!r})")
            src = io.BytesIO(base64.b64decode(payload, validate=True))
        else:
            src = ref
        with Image.open(src) as im:
            if not convert:
                im.verify()
                return None
            return im.convert("RGB")
    except DataError:
        raise
    except (OSError, UnidentifiedImageError, binascii.Error, ValueError, SyntaxError) as e:
        raise DataError(f"{loc}: {what} has an image that cannot be read ({shown!r}: {e})") from None


def place_record_images(record: dict, messages: list[dict], loc: str, base_dir: Path | None) -> None:
    """ShareGPT: put the record's "images" list into `messages` (normalised), at their "<image>" tags."""
    images = record.get("images")
    if images is None:
        return
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list):
        raise DataError(f"{loc}: 'images' must be a list of image paths/URIs, got {type(images).__name__}")
    if not images:
        return
    tags = sum(m["content"].count(SHAREGPT_IMAGE_TAG) for m in messages)
    if tags == 0:
        first = next((m for m in messages if m["role"] == "user"), None)
        if first is None:
            raise DataError(f"{loc}: the record has 'images' but no user message to put them in")
        first["content"] = SHAREGPT_IMAGE_TAG * len(images) + first["content"]
    elif tags != len(images):
        raise DataError(f"{loc}: the record's messages have {tags} {SHAREGPT_IMAGE_TAG} tag(s) for "
                        f"{len(images)} image(s) in 'images'")
    it = iter(images)
    for i, m in enumerate(messages, start=1):
        n = m["content"].count(SHAREGPT_IMAGE_TAG)
        if not n:
            continue
        what = f"message {i}"
        refs = [resolve_image(next(it), base_dir, loc, what) for _ in range(n)]
        m["content"] = m["content"].replace(SHAREGPT_IMAGE_TAG, IMAGE_MARK)
        m["images"] = m.get("images", []) + refs
        check_image_role(m, i, loc)


def check_image_role(message: dict, i: int, loc: str) -> None:
    if message.get("images") and message["role"] == "assistant":
        raise DataError(f"{loc}: message {i} (assistant) has an image; images are accepted in system, user "
                        "and tool turns only (an assistant's tokens are supervised)")


def conversation_images(messages: list[dict]) -> tuple[str, ...]:
    """Every image of a normalised conversation, in the order the template renders them."""
    return tuple(ref for m in messages for ref in m.get("images", ()))


def with_placeholders(messages: list[dict], placeholder: str | None, template_name: str) -> list[dict]:
    """`messages` with each IMAGE_MARK replaced by the template's image placeholder (the same list when none)."""
    if not any(m.get("images") for m in messages):
        return messages
    if placeholder is None:
        raise DataError(f"dataset.chat_template={template_name!r} has no image placeholder, and this "
                        "conversation has images; use 'qwen' or 'qwen3' for Qwen-VL targets, 'kimi-k25-vlm' "
                        "for Kimi-K2.5")
    return [{**m, "content": m["content"].replace(IMAGE_MARK, placeholder)} if m.get("images") else m
            for m in messages]
