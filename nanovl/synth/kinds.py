"""The document kinds: synthetic documents with their ground truth (`make_doc`).

- Kinds: invoice, receipt, form (key-value), table, bar_chart, line_chart, report (multi-page).
  Layout, font, size, colours and values are drawn from `random.Random(f"{kind}:{seed}")`, so a
  (kind, seed) pair always gives the same document on a machine with the same fonts.
- Ground truth comes from what was drawn (render.Page records every string): the transcription,
  key-value fields, question/answer pairs typed extractive / arithmetic / chart / choice, and for
  charts the plotted values with the pixel geometry that encodes them.
- Seeds from EVAL_SEED_START up are reserved for evaluation; `split="train"` refuses them.
- Money is kept in integer cents, so sums are exact and answers print as the page does.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from PIL import Image

from nanovl.synth.render import Page, degrade, fonts_available

KINDS = ("invoice", "receipt", "form", "table", "bar_chart", "line_chart", "report")
EVAL_SEED_START = 1_000_000  # seeds >= this are evaluation data, never training data
QA_TYPES = ("extractive", "arithmetic", "chart", "choice")

FIRST = (
    "Anna Ben Carla David Elena Felix Grace Hugo Ines Jonas Kira Liam Mona Noah Olga Paul Rosa Sven Tara Umar".split()
)
LAST = "Adams Berger Costa Dubois Evans Fischer Garcia Horvat Ito Jensen Kowalski Lopez Meyer Novak Olsen Petit".split()
CITIES = "Berlin Lyon Porto Oslo Austin Denver Leeds Turin Graz Ghent Malmo Cork Bergen Dijon Basel Tampa".split()
STREETS = "Oak Maple Pine Cedar Elm Birch Lake Hill River Park Mill Church Station Garden".split()
SUFFIX = "Ltd GmbH Inc Co SA BV AG LLC".split()
STEMS = "Nova Acme Blue Delta Apex Orion Terra Vertex Lumen Polar Summit Harbor Zenith Atlas Cobalt Maple".split()
TRADE = "Logistics Systems Foods Media Labs Supplies Energy Motors Design Works Textiles Analytics".split()
PRODUCTS = (
    "Paper A4,Toner,Stapler,Desk lamp,USB cable,Monitor,Keyboard,Mouse,Chair,Notebook,Pens (10),"
    "Headset,Webcam,Router,Cleaning,Consulting hour,Delivery,Installation,Licence,Support plan"
).split(",")
GROCERY = "Milk,Bread,Eggs,Apples,Coffee,Tea,Rice,Pasta,Cheese,Butter,Water,Juice,Bananas,Yogurt,Soap".split(",")
CURRENCIES = (("$", ""), ("", " EUR"), ("€", ""), ("£", ""), ("", " USD"))
CATEGORIES = "North South East West Central Online Retail Export Alpha Beta Gamma Delta".split()


@dataclass
class Doc:
    kind: str
    seed: int
    pages: list[Image.Image]  # as delivered (augmented)
    clean: list[Page]  # the pages before augmentation, with every drawn string
    fields: dict = field(default_factory=dict)
    qa: list[dict] = field(default_factory=list)  # {question, answer, type, [choices]}
    chart: dict | None = None  # {labels, values, kind, geometry}
    angles: list[float] = field(default_factory=list)  # rotation applied to each delivered page (degrees)

    @property
    def transcription(self) -> str:
        return "\n\n".join(p.transcription for p in self.clean)


PRINTABLE = "".join(chr(c) for c in range(33, 127))


def random_string(rng) -> str:
    """A string with no language to lean on: random printable characters, a number-like string, or
    one word (as drawn, upper or lower case)."""
    pick = rng.random()
    if pick < 0.4:
        return "".join(rng.choice(PRINTABLE) for _ in range(rng.randint(1, 10)))
    if pick < 0.7:
        forms = ("{:,}.{:02d}", "{:d}.{:02d}", "{:d}/{:02d}", "{:d}-{:02d}", "{:d}:{:02d}", "{:d},{:02d}")
        return rng.choice(forms).format(rng.randint(0, 99999), rng.randint(0, 99))
    word = rng.choice(FIRST + LAST + CITIES + STEMS + TRADE + GROCERY)
    return rng.choice((word, word.upper(), word.lower()))


def money(cents: int, cur: tuple[str, str]) -> str:
    return f"{cur[0]}{cents // 100:,}.{cents % 100:02d}{cur[1]}"


def name(rng) -> str:
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def company(rng) -> str:
    return f"{rng.choice(STEMS)} {rng.choice(TRADE)} {rng.choice(SUFFIX)}"


def date(rng) -> str:
    y, m, d = rng.randint(2015, 2026), rng.randint(1, 12), rng.randint(1, 28)
    return rng.choice([f"{y}-{m:02d}-{d:02d}", f"{d:02d}/{m:02d}/{y}", f"{d:02d}.{m:02d}.{y}"])


def address(rng) -> str:
    return f"{rng.randint(1, 199)} {rng.choice(STREETS)} Street, {rng.choice(CITIES)}"


def faces(rng, base: int) -> dict:
    """Regular, bold and mono faces of one randomly chosen family, sized around `base` pixels."""
    f = fonts_available()
    k = rng.randrange(len(f["regular"]))
    size = base + rng.randint(-2, 3)
    return {
        "regular": (f["regular"][k], size),
        "bold": (f["bold"][min(k, len(f["bold"]) - 1)], size + rng.randint(2, 8)),
        "head": (f["bold"][min(k, len(f["bold"]) - 1)], size),
        "small": (f["regular"][k], max(10, size - 3)),
        "mono": (f["mono"][0], size),
    }


def choice_question(rng, question: str, correct: str, wrong: list[str]) -> dict:
    options = [correct, *rng.sample(sorted(set(wrong) - {correct}), min(3, len(set(wrong) - {correct})))]
    rng.shuffle(options)
    letters = "".join(f"\n{chr(65 + i)}. {o}" for i, o in enumerate(options))
    return {"question": question + letters, "answer": chr(65 + options.index(correct)), "type": "choice",
            "choices": options}  # fmt: skip


def qa(question: str, answer, kind: str) -> dict:
    return {"question": question, "answer": str(answer), "type": kind}


def new_page(rng, w: int, h: int) -> Page:
    tint = rng.choice([(255, 255, 255)] * 3 + [(250, 248, 240), (245, 245, 250), (252, 250, 235)])
    return Page(w, h, tint)


def ink(rng) -> tuple[int, int, int]:
    return rng.choice([(20, 20, 20), (0, 0, 0), (30, 30, 80), (60, 30, 30), (40, 40, 40)])


def line_items(rng, pool, n, max_qty=9, max_price=50000):
    items = [(p, rng.randint(1, max_qty), rng.randint(50, max_price)) for p in rng.sample(pool, n)]
    return items  # (name, qty, unit cents)


def invoice(rng) -> tuple[list[Page], dict, list[dict]]:
    w = rng.randint(640, 820)
    f, fill, cur = faces(rng, 15), ink(rng), rng.choice(CURRENCIES)
    p = new_page(rng, w, rng.randint(760, 980))
    vendor, customer, number = company(rng), name(rng), f"INV-{rng.randint(1000, 99999)}"
    issued, due = date(rng), date(rng)
    items = line_items(rng, PRODUCTS, rng.randint(2, 6))
    rate = rng.choice([0, 5, 7, 10, 19, 20])
    subtotal = sum(q * c for _, q, c in items)
    tax = subtotal * rate // 100
    total = subtotal + tax
    m, y = rng.randint(30, 60), rng.randint(24, 50)
    y = p.write([(m, vendor)], y, f["bold"], fill) + 6
    y = p.write([(m, address(rng))], y, f["small"], fill) + 18
    y = p.write([(m, "INVOICE")], y, f["bold"], fill) + 10
    for label, value in (("Invoice number:", number), ("Date:", issued), ("Due date:", due), ("Bill to:", customer)):
        y = p.write([(m, label), (m + 170, value)], y, f["regular"], fill) + 6
    y += 16
    cols = [m, int(w * 0.50), int(w * 0.62), int(w * 0.80)]
    y = p.write(list(zip(cols, ["Description", "Qty", "Unit price", "Amount"])), y, f["head"], fill, " | ") + 4
    p.draw.line([(m, y + 2), (w - m, y + 2)], fill=fill, width=1)
    y += 8
    for desc, q, c in items:
        row = [desc, str(q), money(c, cur), money(q * c, cur)]
        y = p.write(list(zip(cols, row)), y, f["regular"], fill, " | ") + 6
    y += 12
    for label, value in (("Subtotal:", subtotal), (f"Tax ({rate}%):", tax), ("Total:", total)):
        y = p.write([(cols[2], label), (cols[3], money(value, cur))], y, f["bold" if label == "Total:" else "regular"],
                    fill) + 6  # fmt: skip
    fields = {"vendor": vendor, "invoice_number": number, "date": issued, "due_date": due, "customer": customer,
              "subtotal": money(subtotal, cur), "tax": money(tax, cur), "total": money(total, cur)}  # fmt: skip
    top = max(items, key=lambda it: it[1] * it[2])
    qas = [
        qa("What is the invoice number?", number, "extractive"),
        qa("What is the total amount?", money(total, cur), "extractive"),
        qa("Who is the invoice billed to?", customer, "extractive"),
        qa("What is the invoice date?", issued, "extractive"),
        qa("Which company issued the invoice?", vendor, "extractive"),
        qa("How many line items are on the invoice?", len(items), "arithmetic"),
        qa("What is the total quantity of all items?", sum(q for _, q, _ in items), "arithmetic"),
        qa("How much is the tax plus the subtotal?", money(total, cur), "arithmetic"),
        qa(f"What is the unit price of {items[0][0]}?", money(items[0][2], cur), "extractive"),
        choice_question(rng, "Which item has the largest amount?", top[0], [d for d, _, _ in items] + PRODUCTS[:4]),
    ]
    return [p], fields, qas


def receipt(rng):
    w = rng.randint(360, 460)
    f, fill, cur = faces(rng, 14), ink(rng), rng.choice(CURRENCIES)
    items = line_items(rng, GROCERY, rng.randint(2, 7), max_qty=3, max_price=1500)
    p = new_page(rng, w, 300 + 26 * len(items) + rng.randint(180, 260))
    store, when = f"{rng.choice(STEMS)} Market", date(rng)
    clock = f"{rng.randint(7, 21):02d}:{rng.randint(0, 59):02d}"
    pay = rng.choice(["CASH", "VISA", "MASTERCARD", "DEBIT"])
    m, y = rng.randint(16, 30), rng.randint(16, 40)
    y = p.write([(m, store)], y, f["bold"], fill) + 4
    y = p.write([(m, address(rng))], y, f["small"], fill) + 4
    y = p.write([(m, when), (m + 150, clock)], y, f["regular"], fill) + 14
    right = w - m - 110
    for g, q, c in items:
        label = f"{q} x {g}" if q > 1 else g
        y = p.write([(m, label), (right, money(q * c, cur))], y, f["mono"], fill) + 6
    total = sum(q * c for _, q, c in items)
    y += 10
    p.draw.line([(m, y), (w - m, y)], fill=fill, width=1)
    y = p.write([(m, "TOTAL"), (right, money(total, cur))], y + 8, f["bold"], fill) + 6
    p.write([(m, f"Paid by {pay}")], y + 6, f["regular"], fill)
    dearest = max(items, key=lambda it: it[1] * it[2])
    fields = {"store": store, "date": when, "time": clock, "total": money(total, cur), "payment": pay}
    qas = [
        qa("What is the total?", money(total, cur), "extractive"),
        qa("What is the name of the store?", store, "extractive"),
        qa("What is the date on the receipt?", when, "extractive"),
        qa("At what time was the purchase made?", clock, "extractive"),
        qa("How was the purchase paid?", pay, "extractive"),
        qa("How many different products were bought?", len(items), "arithmetic"),
        qa(f"How much was paid for {items[-1][0]}?", money(items[-1][1] * items[-1][2], cur), "extractive"),
        qa("What is the most expensive line on the receipt?", dearest[0], "arithmetic"),
    ]
    return [p], fields, qas


def form(rng):
    w = rng.randint(600, 800)
    f, fill = faces(rng, 15), ink(rng)
    p = new_page(rng, w, rng.randint(520, 700))
    hours, rate = rng.randint(5, 45), rng.randint(12, 60)
    values = {
        "Full name": name(rng),
        "Date of birth": date(rng),
        "Address": address(rng),
        "Phone": f"+{rng.randint(1, 49)} {rng.randint(100, 999)} {rng.randint(1000000, 9999999)}",
        "Employee ID": f"E{rng.randint(10000, 99999)}",
        "Department": rng.choice(TRADE),
        "Hours worked": str(hours),
        "Hourly rate": str(rate),
    }
    keys = list(values)
    shown = keys[:2] + rng.sample(keys[2:6], 3) + keys[6:]
    title = rng.choice(["Employee Registration Form", "Timesheet", "Personnel Record", "Application Form"])
    m, y = rng.randint(30, 60), rng.randint(24, 48)
    y = p.write([(m, title)], y, f["bold"], fill) + 20
    col = m + rng.randint(170, 220)
    for k in shown:
        y = p.write([(m, f"{k}:"), (col, values[k])], y, f["regular"], fill) + 4
        p.draw.line([(col, y + 2), (w - m, y + 2)], fill=(150, 150, 150), width=1)
        y += rng.randint(12, 22)
    fields = {k: values[k] for k in shown}
    qas = [qa(f"What is the {k.lower()}?" if k != "Full name" else "What is the full name?", values[k], "extractive")
           for k in shown[:6]]  # fmt: skip
    qas.append(qa("What is the pay for the hours worked at the hourly rate?", hours * rate, "arithmetic"))
    qas.append(qa("How many hours were worked?", hours, "extractive"))
    qas.append(choice_question(rng, "What is the title of this form?", title,
                               ["Employee Registration Form", "Timesheet", "Personnel Record", "Application Form",
                                "Invoice"]))  # fmt: skip
    return [p], fields, qas


def table(rng):
    ncol, nrow = rng.randint(2, 4), rng.randint(3, 6)
    f, fill = faces(rng, 15), ink(rng)
    heads = rng.choice([["Q1", "Q2", "Q3", "Q4"], ["2021", "2022", "2023", "2024"], ["Jan", "Feb", "Mar", "Apr"]])[
        :ncol
    ]
    rows = rng.sample(CATEGORIES, nrow)
    data = [[rng.randint(1, 999) for _ in heads] for _ in rows]
    w = rng.randint(520, 760)
    p = new_page(rng, w, 140 + 34 * nrow + rng.randint(40, 120))
    title = f"{rng.choice(['Sales', 'Units', 'Orders', 'Visitors'])} by region"
    m, y = rng.randint(24, 50), rng.randint(20, 40)
    y = p.write([(m, title)], y, f["bold"], fill) + 14
    step = (w - 2 * m - 150) // ncol
    cols = [m] + [m + 150 + i * step for i in range(ncol)]
    y = p.write(list(zip(cols, ["Region", *heads])), y, f["head"], fill, " | ") + 4
    p.draw.line([(m, y + 3), (w - m, y + 3)], fill=fill, width=1)
    y += 10
    for r, vals in zip(rows, data):
        y = p.write(list(zip(cols, [r, *map(str, vals)])), y, f["regular"], fill, " | ") + 10
    i, j = rng.randrange(nrow), rng.randrange(ncol)
    j2 = rng.randrange(ncol)
    best = max(range(nrow), key=lambda k: (data[k][j2], -k))
    fields = {"title": title, "columns": ["Region", *heads], "rows": {r: v for r, v in zip(rows, data)}}
    qas = [
        qa(f"What is the {heads[j]} value for {rows[i]}?", data[i][j], "extractive"),
        qa(f"What is the total of the {heads[j]} column?", sum(d[j] for d in data), "arithmetic"),
        qa(
            f"What is the difference between {rows[0]} and {rows[-1]} in {heads[0]}?",
            data[0][0] - data[-1][0],
            "arithmetic",
        ),  # fmt: skip
        qa("How many regions are listed?", nrow, "arithmetic"),
        qa("What is the title of the table?", title, "extractive"),
        choice_question(rng, f"Which region has the highest {heads[j2]} value?", rows[best], CATEGORIES),
    ]
    return [p], fields, qas


def chart(rng, kind: str):
    n = rng.randint(3, 6)
    f, fill = faces(rng, 13), ink(rng)
    labels = rng.sample(CATEGORIES, n) if kind == "bar_chart" else [str(2018 + i) for i in range(n)]
    top = rng.choice([50, 100, 200, 500])
    values = [rng.randint(1, top // 5) * 5 if rng.random() < 0.5 else rng.randint(1, top) for _ in labels]
    w, h = rng.randint(520, 720), rng.randint(380, 480)
    p = new_page(rng, w, h)
    what = rng.choice(["Revenue", "Units sold", "Customers", "Downloads"])
    title = f"{what} by {'category' if kind == 'bar_chart' else 'year'}"
    p.write([(rng.randint(30, 80), title)], 16, f["bold"], fill)
    x0, x1, base, y_top = 70, w - 30, h - 50, 80
    scale = (base - y_top) / top  # pixels per unit
    p.draw.line([(x0, y_top - 10), (x0, base), (x1, base)], fill=fill, width=1)
    for t in range(0, top + 1, top // 5):  # axis ticks
        ty = base - round(t * scale)
        p.draw.line([(x0 - 5, ty), (x0, ty)], fill=fill, width=1)
        tw = p.text_width(str(t), f["small"])
        p.write([(x0 - 8 - tw, str(t))], ty - f["small"][1] // 2 - 2, f["small"], fill)
    slot = (x1 - x0) // n
    color = rng.choice([(60, 110, 200), (200, 80, 60), (60, 160, 90), (130, 80, 180)])
    show_values = rng.random() < 0.8
    geometry, prev = [], None
    for k, (lab, v) in enumerate(zip(labels, values)):
        cx, vy = x0 + slot * k + slot // 2, base - round(v * scale)
        if kind == "bar_chart":
            bw = int(slot * 0.5)
            p.draw.rectangle([cx - bw // 2, vy, cx + bw // 2, base - 1], fill=color)
        else:
            if prev is not None:
                p.draw.line([prev, (cx, vy)], fill=color, width=2)
            prev = (cx, vy)
        geometry.append((cx, vy))
        lw = p.text_width(lab, f["small"])
        p.write([(cx - lw // 2, lab)], base + 8, f["small"], fill)
    if kind == "line_chart":
        for cx, vy in geometry:  # markers over the line
            p.draw.ellipse([cx - 4, vy - 4, cx + 4, vy + 4], fill=color)
    if show_values:
        for (cx, vy), v in zip(geometry, values):
            vw = p.text_width(str(v), f["small"])
            p.write([(cx - vw // 2, str(v))], vy - f["small"][1] - 10, f["small"], fill)
    hi, lo = max(range(n), key=lambda k: (values[k], -k)), min(range(n), key=lambda k: (values[k], k))
    k = rng.randrange(n)
    chart_truth = {"kind": kind, "labels": labels, "values": values, "title": title,
                   "geometry": {"base": base, "scale": scale, "points": geometry, "color": color}}  # fmt: skip
    qas = [
        qa(f"What is the value for {labels[k]}?", values[k], "chart"),
        qa(f"What is the difference between {labels[hi]} and {labels[lo]}?", values[hi] - values[lo], "chart"),
        qa("What is the sum of all values?", sum(values), "chart"),
        qa("What is the title of the chart?", title, "extractive"),
        choice_question(rng, "Which label has the highest value?", labels[hi], labels + CATEGORIES[:3]),
    ]
    fields = {"title": title, **{lab: v for lab, v in zip(labels, values)}}
    return [p], fields, qas, chart_truth


def report(rng):
    f, fill, cur = faces(rng, 15), ink(rng), rng.choice(CURRENCIES)
    org, n = company(rng), rng.randint(2, 3)
    years = sorted(rng.sample(range(2016, 2026), n))
    facts, pages = {}, []
    w, h = rng.randint(600, 760), rng.randint(600, 800)
    for k, year in enumerate(years):
        p = new_page(rng, w, h)
        m, y = rng.randint(30, 60), rng.randint(24, 48)
        y = p.write([(m, f"{org} annual report"), (w - m - 110, f"Page {k + 1} of {n}")], y, f["small"], fill) + 20
        y = p.write([(m, f"Results for {year}")], y, f["bold"], fill) + 14
        rev, cost = rng.randint(100_000, 900_000) * 100, rng.randint(50_000, 90_000) * 100
        staff, city = rng.randint(10, 900), rng.choice(CITIES)
        facts[year] = {"revenue": rev, "costs": cost, "employees": staff, "office": city, "page": k + 1}
        for label, value in (("Revenue", money(rev, cur)), ("Costs", money(cost, cur)), ("Employees", str(staff)),
                             ("Main office", city)):  # fmt: skip
            y = p.write([(m, f"{label}:"), (m + 170, value)], y, f["regular"], fill) + 10
        pages.append(p)
    a, b = years[0], years[-1]
    fields = {"company": org, "pages": n, **{str(yr): {**v, "revenue": money(v["revenue"], cur),
              "costs": money(v["costs"], cur)} for yr, v in facts.items()}}  # fmt: skip
    qas = [
        qa(f"What was the revenue in {b}?", money(facts[b]["revenue"], cur), "extractive"),
        qa(f"How many employees were there in {a}?", facts[a]["employees"], "extractive"),
        qa("How many pages does the report have?", n, "arithmetic"),
        qa(
            f"What is the revenue minus the costs in {a}?",
            money(facts[a]["revenue"] - facts[a]["costs"], cur),
            "arithmetic",
        ),  # fmt: skip
        qa(f"On which page are the results for {b}?", facts[b]["page"], "extractive"),
        qa(
            f"How did the number of employees change from {a} to {b}?",
            facts[b]["employees"] - facts[a]["employees"],
            "arithmetic",
        ),  # fmt: skip
        choice_question(rng, f"Where was the main office in {b}?", facts[b]["office"], CITIES),
    ]
    return pages, fields, qas


def make_doc(kind: str, seed: int, augment_strength: float = 1.0) -> Doc:
    """The document (kind, seed); deterministic. augment_strength 0 delivers the clean pages."""
    if kind not in KINDS:
        raise ValueError(f"unknown document kind {kind!r}; choose from {', '.join(KINDS)}")
    rng = random.Random(f"{kind}:{seed}")
    chart_truth = None
    if kind in ("bar_chart", "line_chart"):
        pages, fields, qas, chart_truth = chart(rng, kind)
    else:
        pages, fields, qas = {"invoice": invoice, "receipt": receipt, "form": form, "table": table,
                              "report": report}[kind](rng)  # fmt: skip
    aug = random.Random(f"augment:{kind}:{seed}")
    delivered, angles = zip(*(degrade(p.image.copy(), aug, augment_strength) for p in pages))
    return Doc(kind, seed, list(delivered), pages, fields, qas, chart_truth, list(angles))


def text_corpus(per_kind: int) -> list[str]:
    """Training-split text (transcriptions, questions, answers, field JSON) of `per_kind` documents of
    each kind: what a tokenizer for a model of these documents is trained on."""
    import json

    out = []
    for kind in KINDS:
        for seed in range(per_kind):
            doc = make_doc(kind, seed, augment_strength=0)
            out += [doc.transcription, json.dumps(doc.fields)] + [f"{q['question']} {q['answer']}" for q in doc.qa]
    return out
