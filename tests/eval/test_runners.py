"""The runners end to end: tiny data sets in the standard formats and small deterministic models.

The contrastive model embeds an image as a fixed random linear map of its mean (centred) colour
and a text as the same map of the colours it names, so a caption naming an image's colour has
cosine 1 with it. Expected values are worked out by hand or from the colours alone.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlmfast.eval import runners

COLOURS = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
    "cyan": (0, 255, 255), "magenta": (255, 0, 255), "white": (255, 255, 255), "black": (0, 0, 0),
}  # fmt: skip
WORDS = ["<pad>", "a", "photo", "of", "square", "thing", "dot", *COLOURS]


def centred(colour: str) -> np.ndarray:
    return np.array(COLOURS[colour], dtype=np.float64) / 255.0 - 0.5


class ColourModel:
    """encode_image: mean colour (centred) @ proj; encode_text: sum of named colours @ proj."""

    def __init__(self, dim: int = 6, seed: int = 0):
        self.proj = torch.from_numpy(np.random.default_rng(seed).normal(size=(3, dim)))
        table = np.zeros((len(WORDS), 3))
        for i, word in enumerate(WORDS):
            if word in COLOURS:
                table[i] = centred(word)
        self.table = torch.from_numpy(table)
        self.image_calls = self.text_calls = 0

    def encode_image(self, pixel_values):
        self.image_calls += 1
        return pixel_values.mean(dim=(2, 3)) @ self.proj

    def encode_text(self, input_ids, attention_mask):
        self.text_calls += 1
        vectors = self.table[input_ids] * attention_mask[..., None]
        return vectors.sum(dim=1) @ self.proj


def preprocess(image: Image.Image) -> torch.Tensor:
    pixels = np.asarray(image.convert("RGB").resize((8, 8)), dtype=np.float64) / 255.0 - 0.5
    return torch.from_numpy(pixels).permute(2, 0, 1)


def tokenize(texts):
    ids = [[WORDS.index(w) for w in t.lower().replace(".", " ").split() if w in WORDS] or [0] for t in texts]
    length = max(len(row) for row in ids)
    input_ids = torch.tensor([row + [0] * (length - len(row)) for row in ids])
    return {"input_ids": input_ids, "attention_mask": (input_ids != 0).long()}


def solid(path, colour: str, size=(20, 14)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, COLOURS[colour]).save(path)


def _cos(u, v):
    return float(u @ v / np.linalg.norm(u) / np.linalg.norm(v))


def _embed(model, colours):
    proj = model.proj.numpy()
    return np.stack([centred(c) @ proj for c in colours])


# ---------------------------------------------------------------------------------- zero-shot


def test_zeroshot(tmp_path):
    classes = ["black", "blue", "cyan", "green", "magenta", "red", "white", "yellow"]
    # Two right images per class; two images filed under the wrong class.
    for name in classes:
        solid(tmp_path / "data" / name / "0.png", name)
        solid(tmp_path / "data" / name / "1.png", name, size=(9, 31))
    solid(tmp_path / "data" / "red" / "2_wrong.png", "blue")
    solid(tmp_path / "data" / "white" / "2_wrong.png", "black")
    model = ColourModel()
    report = runners.run_zeroshot(
        model, tmp_path / "data", preprocess, tokenize, templates=("a photo of a {}.", "a {} thing"),
        batch_size=5, report=tmp_path / "out" / "zs.json", show_progress=False,
    )
    assert report["num_images"] == 18 and report["num_classes"] == 8
    assert report["top1"] == pytest.approx(16 / 18)
    assert report["per_class_top1"]["red"] == pytest.approx(2 / 3)
    assert report["per_class_top1"]["blue"] == 1.0
    # Top-5: the right images rank first; a mislabelled one counts when its folder's colour is
    # among the 5 classes most similar to its true colour (computed from the colours alone).
    class_vectors = _embed(model, classes)
    hits = 16
    for true, filed in (("blue", "red"), ("black", "white")):
        image = _embed(model, [true])[0]
        order = sorted(range(8), key=lambda c: (-_cos(image, class_vectors[c]), c))
        hits += classes.index(filed) in order[:5]
    assert report["top5"] == pytest.approx(hits / 18)
    assert json.loads((tmp_path / "out" / "zs.json").read_text()) == report
    assert model.image_calls == 4 and model.text_calls == 4  # ceil(18 / 5), ceil(16 / 5)


def test_zeroshot_bad_input(tmp_path):
    with pytest.raises(ValueError, match="root: expected a directory with one sub-folder per class"):
        runners.run_zeroshot(ColourModel(), tmp_path / "missing", preprocess, tokenize)
    (tmp_path / "empty" / "red").mkdir(parents=True)
    with pytest.raises(ValueError, match="root: no images"):
        runners.run_zeroshot(ColourModel(), tmp_path / "empty", preprocess, tokenize)
    solid(tmp_path / "empty" / "red" / "a.png", "red")
    with pytest.raises(ValueError, match=r"class_names: expected 1 names \(one per class folder\), got 2"):
        runners.run_zeroshot(ColourModel(), tmp_path / "empty", preprocess, tokenize, class_names=["a", "b"])
    with pytest.raises(ValueError, match="templates: expected strings with a '{}'"):
        runners.run_zeroshot(ColourModel(), tmp_path / "empty", preprocess, tokenize, templates=["no slot"])
    with pytest.raises(TypeError, match="model: expected an object with encode_image and encode_text"):
        runners.run_zeroshot(object(), tmp_path / "empty", preprocess, tokenize)
    with pytest.raises(ValueError, match="batch_size: expected a positive int, got 0"):
        runners.run_zeroshot(ColourModel(), tmp_path / "empty", preprocess, tokenize, batch_size=0)


# ---------------------------------------------------------------------------------- retrieval

# Image colour -> its captions. "yellow" has one caption naming another colour; "cyan" has none
# naming its own colour.
RETRIEVAL = {
    "red": ["a red square", "red thing"],
    "green": ["a green dot", "a photo of green"],
    "blue": ["blue"],
    "yellow": ["a green thing", "a yellow square", "yellow dot"],
    "cyan": ["a magenta dot", "a white thing"],
}


def _write_coco(tmp_path):
    images, annotations = [], []
    for k, (colour, captions) in enumerate(RETRIEVAL.items()):
        solid(tmp_path / "images" / f"{colour}.png", colour)
        images.append({"id": 100 + k, "file_name": f"{colour}.png"})
        annotations += [{"image_id": 100 + k, "id": len(annotations), "caption": c} for c in captions]
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def _write_karpathy(tmp_path):
    for colour in RETRIEVAL:
        solid(tmp_path / "images" / f"{colour}.png", colour)
    entries = [
        {"filename": f"{c}.png", "filepath": "", "split": "test", "sentences": [{"raw": s} for s in caps]}
        for c, caps in RETRIEVAL.items()
    ]
    entries.append({"filename": "red.png", "split": "train", "sentences": [{"raw": "ignored"}]})
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": entries}))
    return path


def _expected_retrieval(model):
    colours = list(RETRIEVAL)
    images = _embed(model, colours)
    texts, owner = [], []
    for k, captions in enumerate(RETRIEVAL.values()):
        for caption in captions:
            named = [w for w in caption.split() if w in COLOURS]
            texts.append(sum(centred(w) for w in named) @ model.proj.numpy())
            owner.append(k)
    sim = np.array([[_cos(i, t) for t in texts] for i in images])
    rank = lambda row, j: sorted(range(len(row)), key=lambda c: (-row[c], c)).index(j)  # noqa: E731
    i2t = {k: np.mean([min(rank(sim[i], t) for t in range(len(texts)) if owner[t] == i) < k for i in range(len(images))]) for k in (1, 5, 10)}
    t2i = {k: np.mean([rank(sim[:, t], owner[t]) < k for t in range(len(texts))]) for k in (1, 5, 10)}
    return i2t, t2i


@pytest.mark.parametrize("layout", ["coco", "karpathy"])
def test_retrieval(tmp_path, layout):
    annotations = _write_coco(tmp_path) if layout == "coco" else _write_karpathy(tmp_path)
    model = ColourModel(seed=3)
    report = runners.run_retrieval(model, annotations, tmp_path / "images", preprocess, tokenize,
                                   batch_size=2, report=tmp_path / "r.json", show_progress=False)
    assert report["num_images"] == 5 and report["num_texts"] == 10
    # By hand: every caption naming its image's colour finds it first (cosine 1, unique colour):
    # 7 of 10 captions. The image side: cyan alone has no caption with cosine 1.
    assert report["text_to_image"]["R@1"] == pytest.approx(7 / 10)
    assert report["text_to_image"]["R@5"] == 1.0 and report["text_to_image"]["R@10"] == 1.0
    i2t, t2i = _expected_retrieval(model)
    assert report["image_to_text"] == {f"R@{k}": pytest.approx(v) for k, v in i2t.items()}
    assert report["text_to_image"] == {f"R@{k}": pytest.approx(v) for k, v in t2i.items()}
    assert report["image_to_text"]["R@10"] == 1.0 and report["image_to_text"]["R@1"] >= 0.8 - 1e-12
    assert json.loads((tmp_path / "r.json").read_text()) == report


def test_retrieval_bad_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [ {"id": 1, ')
    with pytest.raises(ValueError, match=r"annotations file '.*bad.json': malformed JSON at line 1 column"):
        runners.run_retrieval(ColourModel(), bad, tmp_path, preprocess, tokenize)
    with pytest.raises(ValueError, match=r"annotations: file not found: '.*nothing.json'"):
        runners.run_retrieval(ColourModel(), tmp_path / "nothing.json", tmp_path, preprocess, tokenize)
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.png"}], "annotations": [{"image_id": 1}]}))
    with pytest.raises(ValueError, match=r"annotations file '.*bad.json': annotations\[0\]: missing field 'caption'"):
        runners.run_retrieval(ColourModel(), bad, tmp_path, preprocess, tokenize)
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": 7}], "annotations": []}))
    with pytest.raises(ValueError, match=r"images\[0\]\.file_name: expected a string, got int"):
        runners.run_retrieval(ColourModel(), bad, tmp_path, preprocess, tokenize)
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.png"}], "annotations": [{"image_id": 2, "caption": "a"}]}))
    with pytest.raises(ValueError, match=r"annotations\[0\]\.image_id: 2 is not the id of any entry of images"):
        runners.run_retrieval(ColourModel(), bad, tmp_path, preprocess, tokenize)
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match=r"images: expected a non-empty list, got \[\]"):
        runners.run_retrieval(ColourModel(), bad, tmp_path, preprocess, tokenize)
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.png"}], "annotations": [{"image_id": 1, "caption": "red"}]}))
    with pytest.raises(ValueError, match=r"annotations image 1: image file not found: '.*x.png'"):
        runners.run_retrieval(ColourModel(), bad, tmp_path, preprocess, tokenize)


# ------------------------------------------------------------------------------------- VQA


def colour_name(image: Image.Image) -> str:
    mean = np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(0)
    return min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - mean).sum())


def fake_vqa(images, prompts):
    answers = []
    for image, prompt in zip(images, prompts):
        if "colour" in prompt:
            answers.append(f"The {colour_name(image).title()}.")
        elif "how many" in prompt.lower():
            answers.append("two")
        else:
            answers.append("yes")
    return answers


def _write_vqa(tmp_path):
    rows = [  # (question_id, image colour, question, answers, answer_type, question_type)
        (1, "red", "What colour is it?", ["red"] * 10, "other", "what color"),
        (2, "blue", "What colour is this?", ["blue"] * 2 + ["navy"] * 8, "other", "what color"),
        (3, "green", "How many dots?", ["2"] * 3 + ["3"] * 7, "number", "how many"),
        (4, "yellow", "Is it bright?", ["no"] * 10, "yes/no", "is it"),
    ]
    questions, annotations = [], []
    for qid, colour, question, answers, atype, qtype in rows:
        image_id = 10 + qid
        solid(tmp_path / "val" / f"COCO_val2014_{image_id:012d}.jpg", colour)
        questions.append({"question_id": qid, "image_id": image_id, "question": question})
        annotations.append({"question_id": qid, "image_id": image_id, "answer_type": atype, "question_type": qtype,
                            "answers": [{"answer": a, "answer_id": k + 1} for k, a in enumerate(answers)]})
    qpath, apath = tmp_path / "questions.json", tmp_path / "annotations.json"
    qpath.write_text(json.dumps({"questions": questions}))
    apath.write_text(json.dumps({"annotations": annotations}))
    return qpath, apath


def test_vqa(tmp_path):
    qpath, apath = _write_vqa(tmp_path)
    seen_prompts = []

    def generate(images, prompts):
        seen_prompts.extend(prompts)
        return fake_vqa(images, prompts)

    report = runners.run_vqa(generate, qpath, apath, tmp_path / "val", batch_size=3,
                             prompt="Q: {question} A:", report=tmp_path / "vqa.json", show_progress=False)
    # Hand values: 10 of 10 -> 1; 2 matches -> 0.6; "two" -> "2", 3 matches -> 0.9; 0.
    assert report["accuracy"] == pytest.approx((1 + 0.6 + 0.9 + 0) / 4)
    assert report["per_answer_type"] == {"number": pytest.approx(0.9), "other": pytest.approx(0.8), "yes/no": 0.0}
    assert report["per_question_type"]["what color"] == pytest.approx(0.8)
    assert report["predictions"][0] == {"question_id": 1, "answer": "The Red."}
    assert seen_prompts[2] == "Q: How many dots? A:"
    assert json.loads((tmp_path / "vqa.json").read_text()) == report
    # Questions that name their image file instead (TextVQA / VizWiz style).
    data = json.loads(qpath.read_text())
    for q in data["questions"]:
        q["image"] = f"COCO_val2014_{q.pop('image_id'):012d}.jpg"
    qpath.write_text(json.dumps(data))
    again = runners.run_vqa(fake_vqa, qpath, apath, tmp_path / "val", image_file="unused", show_progress=False)
    assert again["accuracy"] == report["accuracy"]


def test_vqa_bad_input(tmp_path):
    qpath, apath = _write_vqa(tmp_path)
    with pytest.raises(ValueError, match=r"generate: expected a list of 3 strings \(answers\), got 1"):
        runners.run_vqa(lambda images, prompts: ["x"], qpath, apath, tmp_path / "val", batch_size=3, show_progress=False)
    data = json.loads(apath.read_text())
    del data["annotations"][1]["answers"]
    apath.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"annotations file '.*annotations.json': annotations\[1\]: missing field 'answers'"):
        runners.run_vqa(fake_vqa, qpath, apath, tmp_path / "val", show_progress=False)
    data["annotations"].pop(1)
    apath.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"annotations file .*: no annotation for question_id 2 \(questions\[1\] of the questions file\)"):
        runners.run_vqa(fake_vqa, qpath, apath, tmp_path / "val", show_progress=False)
    qpath.write_text("[1, 2")
    with pytest.raises(ValueError, match=r"questions file '.*questions.json': malformed JSON"):
        runners.run_vqa(fake_vqa, qpath, apath, tmp_path / "val", show_progress=False)
    qpath.write_text(json.dumps({"questions": [{"question_id": 1, "image_id": 11}]}))
    with pytest.raises(ValueError, match=r"questions file .*: questions\[0\]: missing field 'question'"):
        runners.run_vqa(fake_vqa, qpath, apath, tmp_path / "val", show_progress=False)
    qpath.write_text(json.dumps({"questions": [{"question_id": 1, "image_id": 99, "question": "?"}]}))
    with pytest.raises(ValueError, match=r"questions file questions\[0\]: image file not found: .*COCO_val2014_000000000099.jpg"):
        runners.run_vqa(fake_vqa, qpath, apath, tmp_path / "val", show_progress=False)


# ---------------------------------------------------------------------------------- captions


def test_caption(tmp_path):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    refs = {
        "red": ["A red square.", "A RED box, on a table!"],
        "green": ["a green square", "green grass"],
        "blue": ["The sky is blue.", "a blue square"],
    }
    images, annotations = [], []
    for k, (colour, captions) in enumerate(refs.items()):
        solid(tmp_path / "img" / f"{colour}.png", colour)
        images.append({"id": k, "file_name": f"{colour}.png"})
        annotations += [{"image_id": k, "caption": c} for c in captions]
    path = tmp_path / "captions_val.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))

    def generate(images, prompts):
        assert prompts == ["Describe."] * len(images)
        return [f"A {colour_name(image)} square." for image in images]

    report = runners.run_caption(generate, path, tmp_path / "img", prompt="Describe.", batch_size=2,
                                 report=tmp_path / "cap.json", show_progress=False)
    # The tokenised text, written by hand, scored by pycocoevalcap.
    gts = {0: ["a red square", "a red box on a table"], 1: ["a green square", "green grass"],
           2: ["the sky is blue", "a blue square"]}
    res = {k: [f"a {c} square"] for k, c in enumerate(refs)}
    expected_bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert [report[f"BLEU-{n}"] for n in range(1, 5)] == pytest.approx(expected_bleu, rel=1e-12)
    assert report["CIDEr-D"] == pytest.approx(Cider().compute_score(gts, res)[0], rel=1e-12)
    assert report["ROUGE-L"] == pytest.approx(Rouge().compute_score(gts, res)[0], rel=1e-12)
    assert report["BLEU-1"] == pytest.approx(1.0, abs=1e-8)  # every candidate is a reference (COCO smoothing)
    assert report["predictions"] == [{"image_id": k, "caption": f"A {c} square."} for k, c in enumerate(refs)]
    assert json.loads((tmp_path / "cap.json").read_text()) == report
    with pytest.raises(ValueError, match=r"generate: answer 0 is int, expected a string"):
        runners.run_caption(lambda images, prompts: [1] * len(images), path, tmp_path / "img", show_progress=False)


def test_progress_bar_on_a_terminal():
    import io

    from vlmfast.eval import _progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    with _progress.Progress(3, "demo", stream=stream, delay=0) as bar:
        for _ in range(3):
            bar.update(1)
    assert "demo [" in stream.getvalue() and "3/3" in stream.getvalue()


class ModuleColourModel(torch.nn.Module):
    """ColourModel as an nn.Module with float32 parameters: pixels must arrive as float32."""

    def __init__(self):
        super().__init__()
        plain = ColourModel(seed=3)
        self.proj = torch.nn.Parameter(plain.proj.float())
        self.register_buffer("table", plain.table.float())

    def encode_image(self, pixel_values):
        assert pixel_values.dtype == torch.float32
        return pixel_values.mean(dim=(2, 3)) @ self.proj

    def encode_text(self, input_ids, attention_mask):
        return (self.table[input_ids] * attention_mask[..., None]).sum(dim=1) @ self.proj


def test_module_model_gets_its_dtype(tmp_path):
    annotations = _write_coco(tmp_path)
    report = runners.run_retrieval(ModuleColourModel(), annotations, tmp_path / "images", preprocess, tokenize,
                                   show_progress=False)
    assert report["text_to_image"]["R@1"] == pytest.approx(7 / 10)
