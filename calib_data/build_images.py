"""Regenerate the calibration images in calib_data/images/ (deterministic: fixed data, fixed seeds, Pillow's
bundled font, so no system fonts are involved).

    python calib_data/build_images.py [OUT_DIR]

The images give the vision tower the kinds of inputs users send: charts, documents with rendered text, and simple
scenes with countable objects.
"""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

W, H = 512, 384
INK = (33, 37, 41)
GRID = (222, 226, 230)
PALETTE = [(47, 111, 94), (214, 122, 53), (66, 103, 178), (189, 64, 87), (130, 92, 168), (120, 144, 60)]


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def axes(d: ImageDraw.ImageDraw, box: tuple[int, int, int, int], y_max: float, step: float, unit: str) -> None:
    """Horizontal grid lines with labels every `step` up to y_max, and the two axis lines."""
    x0, y0, x1, y1 = box
    small = font(12)
    v = 0.0
    while v <= y_max + 1e-9:
        y = y1 - (y1 - y0) * v / y_max
        d.line([(x0, y), (x1, y)], fill=GRID)
        d.text((x0 - 6, y), f"{v:g}", fill=INK, font=small, anchor="rm")
        v += step
    d.line([(x0, y0), (x0, y1), (x1, y1)], fill=INK, width=2)
    d.text((x0 - 6, y0 - 14), unit, fill=INK, font=small, anchor="rm")


def bar_chart() -> Image.Image:
    months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
    rain = [78, 61, 55, 49, 62, 44, 31, 38, 57, 88, 97, 91]
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((W // 2, 22), "Monthly rainfall, Brest 2024", fill=INK, font=font(20), anchor="mm")
    box = (60, 60, 490, 330)
    axes(d, box, 100, 20, "mm")
    slot = (box[2] - box[0]) / len(months)
    for i, (m, r) in enumerate(zip(months, rain, strict=True)):
        x = box[0] + slot * i + slot * 0.18
        top = box[3] - (box[3] - box[1]) * r / 100
        color = PALETTE[2] if r < 80 else PALETTE[3]
        d.rectangle([x, top, x + slot * 0.64, box[3] - 1], fill=color)
        d.text((x + slot * 0.32, top - 4), str(r), fill=INK, font=font(11), anchor="mb")
        d.text((x + slot * 0.32, box[3] + 8), m, fill=INK, font=font(12), anchor="mt")
    d.text((W // 2, 368), "Bars in red: months above 80 mm", fill=INK, font=font(12), anchor="mm")
    return img


def line_chart() -> Image.Image:
    days = list(range(1, 15))
    series = {
        "Oslo": [3, 4, 2, 1, 3, 5, 6, 6, 4, 3, 5, 7, 8, 7],
        "Madrid": [14, 15, 17, 16, 18, 19, 17, 16, 18, 20, 21, 19, 18, 20],
        "Tokyo": [9, 10, 12, 11, 9, 8, 10, 12, 13, 13, 11, 12, 14, 15],
    }
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((W // 2, 22), "Daily high temperature, first two weeks of March", fill=INK, font=font(17), anchor="mm")
    box = (60, 60, 420, 330)
    axes(d, box, 25, 5, "°C")
    for i, day in enumerate(days):
        x = box[0] + (box[2] - box[0]) * i / (len(days) - 1)
        if day % 2:
            d.text((x, box[3] + 8), str(day), fill=INK, font=font(12), anchor="mt")
    for k, (city, temps) in enumerate(series.items()):
        pts = [
            (box[0] + (box[2] - box[0]) * i / (len(temps) - 1), box[3] - (box[3] - box[1]) * t / 25)
            for i, t in enumerate(temps)
        ]
        d.line(pts, fill=PALETTE[k], width=3)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=PALETTE[k])
        d.rectangle([432, 80 + 24 * k, 448, 92 + 24 * k], fill=PALETTE[k])
        d.text((454, 86 + 24 * k), city, fill=INK, font=font(13), anchor="lm")
    d.text((240, 362), "day of month", fill=INK, font=font(12), anchor="mm")
    return img


def pie_chart() -> Image.Image:
    shares = [("Rail", 38), ("Bus", 24), ("Car", 21), ("Bike", 11), ("Walk", 6)]
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((W // 2, 22), "How employees commute (survey, n = 412)", fill=INK, font=font(18), anchor="mm")
    cx, cy, r = 190, 210, 140
    start = -90.0
    for k, (name, pct) in enumerate(shares):
        end = start + 360 * pct / 100
        d.pieslice([cx - r, cy - r, cx + r, cy + r], start, end, fill=PALETTE[k], outline="white", width=2)
        mid = math.radians((start + end) / 2)
        d.text((cx + 0.68 * r * math.cos(mid), cy + 0.68 * r * math.sin(mid)), f"{pct}%", fill="white",
               font=font(14), anchor="mm")  # fmt: skip
        d.rectangle([370, 120 + 30 * k, 388, 138 + 30 * k], fill=PALETTE[k])
        d.text((396, 129 + 30 * k), name, fill=INK, font=font(15), anchor="lm")
        start = end
    return img


def document() -> Image.Image:
    img = Image.new("RGB", (W, 640), (252, 251, 247))
    d = ImageDraw.Draw(img)
    d.text((40, 36), "INVOICE", fill=INK, font=font(30))
    d.text((472, 44), "No. 2024-0193\nDate: 14 Nov 2024\nDue: 14 Dec 2024", fill=INK, font=font(13), anchor="ra",
           align="right")  # fmt: skip
    d.text((40, 100), "Bill to:\nHarbour Street Bakery\n12 Harbour Street\nPortsmouth PO1 3AX", fill=INK, font=font(14))
    rows = [("Description", "Qty", "Unit", "Amount"), ("Oven servicing", "1", "180.00", "180.00"),
            ("Door seal, replacement", "2", "34.50", "69.00"), ("Thermostat probe", "1", "42.00", "42.00"),
            ("Travel (flat rate)", "1", "25.00", "25.00")]  # fmt: skip
    y = 210
    cols = [40, 300, 360, 472]
    for i, row in enumerate(rows):
        if i == 0:
            d.rectangle([36, y - 6, 476, y + 20], fill=(233, 236, 239))
        for j, cell in enumerate(row):
            d.text((cols[j], y), cell, fill=INK, font=font(14), anchor="la" if j == 0 else "ra")
        y += 30
        d.line([(36, y - 8), (476, y - 8)], fill=GRID)
    for label, value in (("Subtotal", "316.00"), ("VAT 20%", "63.20"), ("Total", "379.20")):
        d.text((360, y), label, fill=INK, font=font(14), anchor="ra")
        d.text((472, y), value, fill=INK, font=font(16 if label == "Total" else 14), anchor="ra")
        y += 26
    note = ("Payment by bank transfer within 30 days. Please quote the invoice number as the reference. "
            "Thank you for your business; the next routine service is due in May.")  # fmt: skip
    words, line, y = note.split(), "", y + 30
    for w in words:
        if d.textlength(f"{line} {w}".strip(), font=font(14)) > 430:
            d.text((40, y), line, fill=INK, font=font(14))
            line, y = w, y + 22
        else:
            line = f"{line} {w}".strip()
    d.text((40, y), line, fill=INK, font=font(14))
    return img


def timetable() -> Image.Image:
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([0, 0, W, 48], fill=PALETTE[0])
    d.text((20, 24), "Line 4  Central Station -> Airport", fill="white", font=font(18), anchor="lm")
    stops = ["Central Station", "Market Square", "University", "Hospital", "Business Park", "Airport"]
    departures = ["06:10", "06:40", "07:05", "07:25", "07:45"]
    offsets = [0, 4, 9, 13, 19, 27]
    d.text((20, 70), "Stop", fill=INK, font=font(14))
    for j in range(len(departures)):
        d.text((220 + 60 * j, 70), f"Trip {j + 1}", fill=INK, font=font(14))
    for i, (stop, off) in enumerate(zip(stops, offsets, strict=True)):
        y = 100 + 40 * i
        if i % 2 == 0:
            d.rectangle([10, y - 8, W - 10, y + 24], fill=(241, 243, 245))
        d.text((20, y), stop, fill=INK, font=font(14))
        for j, dep in enumerate(departures):
            h, m = map(int, dep.split(":"))
            t = h * 60 + m + off
            d.text((220 + 60 * j, y), f"{t // 60:02d}:{t % 60:02d}", fill=INK, font=font(14))
    d.text((20, 350), "Weekdays only. Step-free access at all stops.", fill=INK, font=font(13))
    return img


def scene_house() -> Image.Image:
    img = Image.new("RGB", (W, H))
    d = ImageDraw.Draw(img)
    for y in range(300):  # sky gradient
        t = y / 300
        d.line([(0, y), (W, y)], fill=(int(110 + 90 * t), int(170 + 60 * t), int(235 + 15 * t)))
    d.ellipse([400, 40, 460, 100], fill=(255, 214, 90))
    d.polygon([(0, 270), (140, 200), (300, 260), (420, 210), (W, 250), (W, H), (0, H)], fill=(104, 163, 84))
    d.rectangle([0, 300, W, H], fill=(86, 140, 70))
    d.rectangle([180, 200, 320, 310], fill=(224, 200, 160), outline=INK)  # house
    d.polygon([(170, 205), (250, 145), (330, 205)], fill=(170, 60, 50), outline=INK)
    d.rectangle([235, 250, 265, 310], fill=(120, 80, 50), outline=INK)
    for x in (195, 280):
        d.rectangle([x, 225, x + 28, 250], fill=(190, 225, 245), outline=INK)
    for x in (70, 420):  # trees
        d.rectangle([x - 6, 250, x + 6, 300], fill=(110, 75, 45))
        d.ellipse([x - 35, 185, x + 35, 260], fill=(48, 120, 60))
    return img


def scene_shapes() -> Image.Image:
    img = Image.new("RGB", (W, H), (245, 240, 230))
    d = ImageDraw.Draw(img)
    rng = random.Random(7)
    items = [("circle", PALETTE[3])] * 3 + [("square", PALETTE[2])] * 2 + [("triangle", PALETTE[1])] * 4
    cells = rng.sample([(c, r) for c in range(5) for r in range(3)], len(items))
    for (kind, color), (c, r) in zip(items, cells, strict=True):
        x, y = 60 + 100 * c + rng.randint(-12, 12), 70 + 110 * r + rng.randint(-12, 12)
        if kind == "circle":
            d.ellipse([x - 30, y - 30, x + 30, y + 30], fill=color)
        elif kind == "square":
            d.rectangle([x - 28, y - 28, x + 28, y + 28], fill=color)
        else:
            d.polygon([(x, y - 32), (x - 32, y + 26), (x + 32, y + 26)], fill=color)
    return img


def scene_city_night() -> Image.Image:
    img = Image.new("RGB", (W, H), (18, 24, 48))
    d = ImageDraw.Draw(img)
    rng = random.Random(11)
    for _ in range(60):  # stars
        x, y = rng.randrange(W), rng.randrange(160)
        d.point((x, y), fill=(230, 230, 200))
    d.ellipse([60, 40, 100, 80], fill=(240, 236, 210))
    d.ellipse([72, 34, 112, 74], fill=(18, 24, 48))  # crescent moon
    x = 0
    while x < W:
        bw, bh = rng.randint(40, 80), rng.randint(120, 300)
        d.rectangle([x, H - bh, x + bw, H], fill=(40, 44, 60))
        for wy in range(H - bh + 12, H - 10, 18):
            for wx in range(x + 8, x + bw - 10, 14):
                if rng.random() < 0.45:
                    d.rectangle([wx, wy, wx + 6, wy + 9], fill=(250, 210, 110))
        x += bw + rng.randint(2, 10)
    return img


IMAGES = {
    "bar_chart.png": bar_chart,
    "line_chart.png": line_chart,
    "pie_chart.png": pie_chart,
    "document_invoice.png": document,
    "document_timetable.png": timetable,
    "scene_house.png": scene_house,
    "scene_shapes.png": scene_shapes,
    "scene_city_night.png": scene_city_night,
}


def build(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, make in IMAGES.items():
        path = out / name
        make().save(path, optimize=True)
        paths.append(path)
    return paths


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "images"
    for p in build(target):
        print(f"{p}  {p.stat().st_size} bytes")
