"""A synthetic audio-visual question-answering task in the spirit of MUSIC-AVQA, pure numpy.

Each sample is a small picture (one or two coloured shapes), a short sound (1-4 tone beeps of one pitch and
timbre), a question and a one- or two-word answer. Three families of questions: `image` (answerable from the
picture alone), `audio` (from the sound alone) and `both` (needs the picture and the sound). Every family has
several templates, so the question's words decide which attribute is asked about: the same picture and sound
answer different questions differently (`questions_about` lists them all).

`make_sample(seed, index)` is a pure function of its arguments. Answers are balanced by construction: the
template is picked by cycling through the family's templates and the answer by a seeded permutation of the
template's answers in blocks, then a scene is drawn (by rejection) whose true answer is that one. So no
answer prior can be learnt within a template.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable

import numpy as np

COLOURS = ("red", "green", "blue", "yellow")
KINDS = ("circle", "square", "triangle")
PITCHES = ("low", "high")
TIMBRES = ("pure", "buzzy")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
MAX_SHAPES = 2
MAX_BEEPS = 4
FAMILIES = ("image", "audio", "both")

_RGB = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (230, 215, 40)}
# Pitch classes are frequency bands, so the label is the band and not one exact frequency.
_PITCH_HZ = {"low": (200.0, 330.0), "high": (800.0, 1300.0)}
_MAX_REJECTIONS = 10_000  # the least likely target (an answer of prob. 1/8 of scenes) needs ~8 draws on average


@dataclasses.dataclass(frozen=True)
class Shape:
    """One shape of a picture: centre (x, y) and radius as fractions of the image side."""

    kind: str
    colour: str
    x: float
    y: float
    radius: float


@dataclasses.dataclass(frozen=True)
class AVScene:
    """The attributes a picture and a sound are rendered from (shapes sorted left to right)."""

    shapes: tuple[Shape, ...]
    background: int  # grey level of the picture's background
    num_beeps: int
    pitch: str
    timbre: str
    frequency: float
    onsets: tuple[float, ...]  # beep start times, seconds
    beep_seconds: float
    amplitude: float
    noise: float


@dataclasses.dataclass(frozen=True)
class QA:
    """One question about a scene: its template name, text and answer."""

    template: str
    question: str
    answer: str


@dataclasses.dataclass(frozen=True)
class AVQASample:
    """A rendered sample: image uint8 [H, W, 3], audio float32 [sample_rate * seconds], and its question."""

    seed: int
    index: int
    image: np.ndarray
    audio: np.ndarray
    sample_rate: int
    question: str
    answer: str
    family: str
    template: str
    scene: AVScene


@dataclasses.dataclass(frozen=True)
class Template:
    """A question template: its family, its wording, its possible answers (in a fixed order) and its rule.

    `question` may hold one `{}` slot, filled with each of `slots` ("what colour is the {}?" with the kinds);
    `rule(scene, slot)` answers it, or returns None where the question would be ambiguous or meaningless.
    """

    name: str
    family: str
    question: str
    answers: tuple[str, ...]
    rule: Callable[[AVScene, str | None], str | None]
    slots: tuple[str, ...] = ()

    def phrasings(self) -> list[tuple[str | None, str]]:
        """(slot, question text) for every slot value (one, slot None, for a template without a slot)."""
        return [(slot, self.question.format(slot)) for slot in self.slots] if self.slots else [(None, self.question)]

    def ask(self, scene: AVScene) -> list[tuple[str, str]]:
        """Every (question, answer) this template can pose about the scene."""
        out = []
        for slot, text in self.phrasings():
            answer = self.rule(scene, slot)
            if answer is not None:
                out.append((text, answer))
        return out


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def _unique(scene: AVScene, attribute: str, value: str | None) -> Shape | None:
    found = [s for s in scene.shapes if getattr(s, attribute) == value]
    return found[0] if len(found) == 1 else None


def _colour_of_kind(scene: AVScene, kind: str | None) -> str | None:
    shape = _unique(scene, "kind", kind)
    return shape.colour if shape else None


def _kind_of_colour(scene: AVScene, colour: str | None) -> str | None:
    shape = _unique(scene, "colour", colour)
    return shape.kind if shape else None


def _colour_and_pitch(scene: AVScene, _slot: str | None) -> str | None:
    # Ambiguous with two shapes, so only asked about single-shape pictures.
    return f"{scene.shapes[0].colour} {scene.pitch}" if len(scene.shapes) == 1 else None


_BEEP_COUNTS = NUMBER_WORDS[1:MAX_BEEPS + 1]
TEMPLATES: tuple[Template, ...] = (
    Template("count_shapes", "image", "how many shapes are in the picture?", NUMBER_WORDS[1:MAX_SHAPES + 1],
             lambda s, _: NUMBER_WORDS[len(s.shapes)]),
    Template("colour_of_kind", "image", "what colour is the {}?", COLOURS, _colour_of_kind, KINDS),
    Template("kind_of_colour", "image", "what shape is the {} one?", KINDS, _kind_of_colour, COLOURS),
    Template("leftmost_colour", "image", "what colour is the leftmost shape?", COLOURS,
             lambda s, _: s.shapes[0].colour),
    Template("is_there_kind", "image", "is there a {} in the picture?", ("yes", "no"),
             lambda s, kind: _yes_no(any(x.kind == kind for x in s.shapes)), KINDS),
    Template("count_beeps", "audio", "how many beeps do you hear?", _BEEP_COUNTS,
             lambda s, _: NUMBER_WORDS[s.num_beeps]),
    Template("pitch", "audio", "is the sound high or low?", PITCHES, lambda s, _: s.pitch),
    Template("timbre", "audio", "is the tone pure or buzzy?", TIMBRES, lambda s, _: s.timbre),
    Template("more_than_two_beeps", "audio", "are there more than two beeps?", ("yes", "no"),
             lambda s, _: _yes_no(s.num_beeps > 2)),
    Template("beeps_equal_shapes", "both", "are there as many beeps as shapes?", ("yes", "no"),
             lambda s, _: _yes_no(s.num_beeps == len(s.shapes))),
    Template("total_count", "both", "how many shapes and beeps are there in total?",
             NUMBER_WORDS[2:MAX_SHAPES + MAX_BEEPS + 1], lambda s, _: NUMBER_WORDS[len(s.shapes) + s.num_beeps]),
    Template("colour_and_pitch", "both", "what colour is the shape and is the sound high or low?",
             tuple(f"{c} {p}" for c in COLOURS for p in PITCHES), _colour_and_pitch),
    Template("kind_and_beeps", "both", "what is the leftmost shape and how many beeps are there?",
             tuple(f"{k} {n}" for k in KINDS for n in _BEEP_COUNTS),
             lambda s, _: f"{s.shapes[0].kind} {NUMBER_WORDS[s.num_beeps]}"),
)
TEMPLATES_BY_NAME = {t.name: t for t in TEMPLATES}
TEMPLATES_BY_FAMILY = {f: tuple(t for t in TEMPLATES if t.family == f) for f in FAMILIES}
# Indices whose within-template answer blocks line up: a split starting at a multiple of this is balanced too.
BALANCE_PERIOD = len(FAMILIES) * math.lcm(*(len(ts) for ts in TEMPLATES_BY_FAMILY.values())) * math.lcm(
    *(len(t.answers) for t in TEMPLATES))


def questions_about(scene: AVScene) -> list[QA]:
    """Every question any template can ask about the scene, with its answer (template order, then slot order)."""
    return [QA(t.name, q, a) for t in TEMPLATES for q, a in t.ask(scene)]


def draw_scene(rng: np.random.Generator, *, seconds: float = 1.0) -> AVScene:
    """Draw a scene uniformly over its attributes (the jitter of positions, sizes, frequency and timing too)."""
    n_shapes = int(rng.integers(1, MAX_SHAPES + 1))
    shapes = []
    for i in range(n_shapes):
        # Two shapes sit in the left and right halves, so "leftmost" is well defined and they never overlap.
        lo, hi = (0.25, 0.75) if n_shapes == 1 else ((0.2, 0.3) if i == 0 else (0.7, 0.8))
        radius = float(rng.uniform(0.13, 0.19))
        shapes.append(Shape(kind=KINDS[rng.integers(len(KINDS))], colour=COLOURS[rng.integers(len(COLOURS))],
                            x=float(rng.uniform(lo, hi)), y=float(rng.uniform(0.3, 0.7)), radius=radius))
    num_beeps = int(rng.integers(1, MAX_BEEPS + 1))
    pitch = PITCHES[rng.integers(len(PITCHES))]
    beep_seconds = 0.1 * seconds
    gap = float(rng.uniform(0.06, 0.1)) * seconds
    span = num_beeps * beep_seconds + (num_beeps - 1) * gap
    start = float(rng.uniform(0.02 * seconds, seconds - span - 0.02 * seconds))
    return AVScene(
        shapes=tuple(shapes),
        background=int(rng.integers(20, 70)),
        num_beeps=num_beeps,
        pitch=pitch,
        timbre=TIMBRES[rng.integers(len(TIMBRES))],
        frequency=float(rng.uniform(*_PITCH_HZ[pitch])),
        onsets=tuple(start + k * (beep_seconds + gap) for k in range(num_beeps)),
        beep_seconds=beep_seconds,
        amplitude=float(rng.uniform(0.3, 0.6)),
        noise=float(rng.uniform(0.005, 0.02)),
    )


def render_image(scene: AVScene, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """uint8 [size, size, 3]: the shapes on a grey background, with a little pixel noise."""
    image = np.full((size, size, 3), scene.background, np.float32)
    centres = (np.arange(size, dtype=np.float32) + 0.5) / size
    y, x = np.meshgrid(centres, centres, indexing="ij")
    for shape in scene.shapes:
        dx, dy, r = x - shape.x, y - shape.y, shape.radius
        if shape.kind == "circle":
            inside = dx**2 + dy**2 <= r**2
        elif shape.kind == "square":
            inside = (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
        else:  # an upward triangle: apex at y - r, base at y + r, half-width r at the base
            inside = (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
        image[inside] = _RGB[shape.colour]
    image += rng.normal(0.0, 4.0, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_audio(scene: AVScene, rng: np.random.Generator, *, sample_rate: int = 16_000,
                 seconds: float = 1.0) -> np.ndarray:
    """float32 [sample_rate * seconds]: the beeps (sine = pure, square = buzzy) with short fades, plus noise."""
    n = round(sample_rate * seconds)
    audio = rng.normal(0.0, scene.noise, n).astype(np.float32)
    beep_len = round(scene.beep_seconds * sample_rate)
    t = np.arange(beep_len, dtype=np.float32) / sample_rate
    tone = np.sin(2 * np.pi * scene.frequency * t)
    if scene.timbre == "buzzy":
        tone = np.sign(tone) * 0.6  # a square wave at a similar loudness
    fade = min(beep_len // 2, int(0.005 * sample_rate))  # 5 ms ramps: no clicks that would add "beeps"
    envelope = np.ones(beep_len, np.float32)
    envelope[:fade] = np.linspace(0, 1, fade, dtype=np.float32)
    envelope[beep_len - fade:] = np.linspace(1, 0, fade, dtype=np.float32)
    for onset in scene.onsets:
        start = round(onset * sample_rate)
        stop = min(n, start + beep_len)
        audio[start:stop] += scene.amplitude * (tone * envelope)[: stop - start]
    return audio


def _target(seed: int, family_index: int, template_index: int, k: int, answers: tuple[str, ...]) -> str:
    """The k-th answer of a template: answers in blocks of len(answers), each block a seeded permutation."""
    block, offset = divmod(k, len(answers))
    order = np.random.default_rng([seed, family_index, template_index, block, 0xA5]).permutation(len(answers))
    return answers[order[offset]]


def make_sample(seed: int, index: int, *, image_size: int = 32, sample_rate: int = 16_000,
                seconds: float = 1.0) -> AVQASample:
    """Sample `index` of the task with this seed (a pure function of its arguments).

    index % 3 picks the family; within it, templates take turns and answers are balanced per template.
    """
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    family_index, j = index % len(FAMILIES), index // len(FAMILIES)
    family = FAMILIES[family_index]
    templates = TEMPLATES_BY_FAMILY[family]
    template_index, k = j % len(templates), j // len(templates)
    template = templates[template_index]
    target = _target(seed, family_index, template_index, k, template.answers)

    rng = np.random.default_rng([seed, index])
    for _ in range(_MAX_REJECTIONS):
        scene = draw_scene(rng, seconds=seconds)
        matching = [(q, a) for q, a in template.ask(scene) if a == target]
        if matching:
            question, answer = matching[rng.integers(len(matching))]
            break
    else:  # unreachable with the shipped templates: every answer has a sizeable share of scenes
        raise RuntimeError(f"no scene for template {template.name!r} with answer {target!r}")
    return AVQASample(
        seed=seed, index=index,
        image=render_image(scene, rng, image_size),
        audio=render_audio(scene, rng, sample_rate=sample_rate, seconds=seconds),
        sample_rate=sample_rate, question=question, answer=answer, family=family, template=template.name,
        scene=scene,
    )


def _shapes_caption(shapes: list[tuple[str, str]]) -> str:
    return " and ".join(f"a {colour} {kind}" for colour, kind in shapes)


def _beeps_caption(num_beeps: int, pitch: str, timbre: str) -> str:
    return f"{NUMBER_WORDS[num_beeps]} {pitch} {timbre} beep{'s' if num_beeps > 1 else ''}"


def image_caption(sample: AVQASample) -> str:
    """'a red circle' or 'a red circle and a blue square' (left to right)."""
    return _shapes_caption([(s.colour, s.kind) for s in sample.scene.shapes])


def audio_caption(sample: AVQASample) -> str:
    """'three high pure beeps' / 'one low buzzy beep'."""
    scene = sample.scene
    return _beeps_caption(scene.num_beeps, scene.pitch, scene.timbre)


def possible_image_captions() -> list[str]:
    """Every caption `image_caption` can return (to size sequences without drawing samples)."""
    one = list(itertools.product(COLOURS, KINDS))
    return [_shapes_caption(list(c)) for n in range(1, MAX_SHAPES + 1) for c in itertools.product(one, repeat=n)]


def possible_audio_captions() -> list[str]:
    """Every caption `audio_caption` can return."""
    return [_beeps_caption(n, p, t) for n in range(1, MAX_BEEPS + 1) for p in PITCHES for t in TIMBRES]


# Class counts of the encoder pre-training labels; "second_*" has a last class for "no second shape".
IMAGE_LABEL_CLASSES = {"num_shapes": MAX_SHAPES, "first_colour": len(COLOURS), "first_kind": len(KINDS),
                       "second_colour": len(COLOURS) + 1, "second_kind": len(KINDS) + 1}
AUDIO_LABEL_CLASSES = {"num_beeps": MAX_BEEPS, "pitch": len(PITCHES), "timbre": len(TIMBRES)}


def image_labels(sample: AVQASample) -> dict[str, int]:
    """Class indices of the picture's attributes (see IMAGE_LABEL_CLASSES), for pre-training an image encoder."""
    shapes = sample.scene.shapes
    second = shapes[1] if len(shapes) > 1 else None
    return {
        "num_shapes": len(shapes) - 1,
        "first_colour": COLOURS.index(shapes[0].colour),
        "first_kind": KINDS.index(shapes[0].kind),
        "second_colour": COLOURS.index(second.colour) if second else len(COLOURS),
        "second_kind": KINDS.index(second.kind) if second else len(KINDS),
    }


def audio_labels(sample: AVQASample) -> dict[str, int]:
    """Class indices of the sound's attributes (see AUDIO_LABEL_CLASSES), for pre-training an audio encoder."""
    scene = sample.scene
    return {"num_beeps": scene.num_beeps - 1, "pitch": PITCHES.index(scene.pitch),
            "timbre": TIMBRES.index(scene.timbre)}
