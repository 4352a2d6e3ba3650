#!/usr/bin/env python3
"""Draw the shipped VLM sample data: data/VLM/{cali,eval}/general_custom_data (images + samples.json).

    python tools/make_vlm_sample_data.py            # rewrites both folders (deterministic)

Every image is drawn here with PIL (shapes, colours, a word of text), so the data carries no third-party
license. Calibration and evaluation scenes differ.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
SIZE = (336, 252)
# (file, background, [(shape, colour, box)], text, question, answer)
CALIB = [
    ("red_circle.png", "white", [("ellipse", "red", (98, 56, 238, 196))], None,
     "What shape is in the picture, and what colour is it?", "A red circle in the middle of a white background."),
    ("blue_square.png", "lightyellow", [("rectangle", "blue", (108, 66, 228, 186))], None,
     "Describe the image.", "A blue square on a pale yellow background."),
    ("two_shapes.png", "white", [("ellipse", "green", (30, 70, 140, 180)), ("rectangle", "orange", (196, 70, 306, 180))],
     None, "How many shapes are there and what are they?", "Two shapes: a green circle on the left and an orange square on the right."),
    ("stop_sign.png", "lightgray", [("octagon", "red", (98, 56, 238, 196))], "STOP",
     "What does the sign say?", "The red octagon sign says STOP."),
    ("traffic_light.png", "skyblue", [("rectangle", "black", (138, 20, 198, 232)), ("ellipse", "red", (148, 30, 188, 80)),
                                      ("ellipse", "yellow", (148, 106, 188, 146)), ("ellipse", "green", (148, 180, 188, 220))],
     None, "What object is shown?", "A traffic light with red, yellow and green lights, in front of a blue sky."),
    ("text_hello.png", "white", [], "HELLO 2024", "What text is written in the image?", "The image says HELLO 2024."),
    ("purple_triangle.png", "white", [("triangle", "purple", (88, 206, 248, 206))], None,
     "What shape do you see?", "A purple triangle pointing up."),
    ("grid.png", "white", [("rectangle", c, (20 + 80 * i, 60, 90 + 80 * i, 130)) for i, c in
                           enumerate(["red", "green", "blue", "black"])], None,
     "List the colours of the squares from left to right.", "Red, green, blue and black."),
]
EVAL = [
    ("yellow_sun.png", "skyblue", [("ellipse", "yellow", (200, 20, 300, 120)), ("rectangle", "green", (0, 200, 336, 252))],
     None, "Describe the scene.", "A yellow sun in a blue sky above green grass."),
    ("three_circles.png", "white", [("ellipse", c, (20 + 105 * i, 90, 100 + 105 * i, 170)) for i, c in
                                    enumerate(["red", "blue", "green"])], None,
     "How many circles are there?", "There are three circles: red, blue and green."),
    ("sign_open.png", "white", [("rectangle", "darkgreen", (58, 76, 278, 176))], "OPEN",
     "What does the sign say?", "The green sign says OPEN."),
    ("black_square.png", "white", [("rectangle", "black", (118, 76, 218, 176))], None,
     "Is there a circle in the image? Please answer yes or no.", "No"),
    ("orange_circle.png", "white", [("ellipse", "orange", (118, 76, 218, 176))], None,
     "Is there a circle in the image? Please answer yes or no.", "Yes"),
    ("number.png", "lightyellow", [], "42", "Which number is written in the image?", "The number 42."),
]


def draw(background: str, shapes: list, text: str | None) -> Image.Image:
    img = Image.new("RGB", SIZE, background)
    d = ImageDraw.Draw(img)
    for kind, colour, box in shapes:
        if kind == "ellipse":
            d.ellipse(box, fill=colour)
        elif kind == "rectangle":
            d.rectangle(box, fill=colour)
        elif kind == "octagon":
            x0, y0, x1, y1 = box
            d.regular_polygon(((x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2), 8, rotation=22.5, fill=colour)
        elif kind == "triangle":
            x0, y, x1, _ = box
            d.polygon([(x0, y), (x1, y), ((x0 + x1) / 2, y - 150)], fill=colour)
    if text:
        d.text((SIZE[0] / 2, SIZE[1] / 2), text, fill="white" if shapes else "black", anchor="mm", font_size=40)
    return img


def write(folder: Path, scenes: list) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for name, bg, shapes, text, question, answer in scenes:
        draw(bg, shapes, text).save(folder / "images" / name, optimize=True)
        rows.append({"image": f"images/{name}", "question": question, "answer": answer})
    rows.append({"question": "What colour do you get by mixing blue and yellow?", "answer": "Green."})  # text-only row
    (folder / "samples.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(REPO / "data" / "VLM"), help="parent of cali/ and eval/")
    args = parser.parse_args()
    root = Path(args.root)
    write(root / "cali" / "general_custom_data", CALIB)
    write(root / "eval" / "general_custom_data", EVAL)
    print(f"wrote {root}/cali/general_custom_data ({len(CALIB)} images) and {root}/eval/general_custom_data ({len(EVAL)} images)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
