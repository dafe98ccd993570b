"""``webshop``: buy the product an instruction asks for, in WebShop's action syntax and with its reward.

Pages and actions follow WebShop (Yao et al., 2022): the search page takes ``search[query]``; a results page
lists products (``click[<id>]``, ``click[next >]``, ``click[< prev]``, ``click[back to search]``); a product page
shows its options (``click[<value>]`` picks one), ``click[description]``, ``click[features]`` and
``click[buy now]``, which ends the episode. The reward is WebShop's

    r = r_type * (|attributes matched| + |options matched| + 1[price <= budget]) / (|attributes| + |options| + 1)

where ``r_type`` is 1 for the right kind of product, 0.5, 0.1 or 0 as the bought product's type drifts from the
goal's. Two simplifications, since spaCy and fuzzy matching are not dependencies: the type words are the
title's words that are not stop words (WebShop uses spaCy's nouns), and an attribute or option matches after
normalisation (lower case, no punctuation) when it equals one of the product's or appears in its text
(WebShop accepts a fuzzy match above 85). An episode counts as a success when r = 1.

Offline by default over a generated catalogue (brands, product types, attributes, options and prices drawn
from ``catalogue_seed``; every goal is one product's attributes, one value per option and a budget above its
price). ``products`` and ``attributes`` point to WebShop's own files (``items_shuffle_1000.json`` and
``items_ins_v2_1000.json``) when you have them; their goals are built as WebShop builds its synthetic goals.
Easier levels for small models: ``start_on_results: true`` opens each episode on the results of searching the
instruction itself, and ``untagged: lenient`` reads a reply with no action as a query (on the search page) or
as a click on the first button it names; ``options_in_goal: false`` leaves the options out of the goals, and
``buy_on_open: true`` buys a product as soon as it is opened, so that the task is to pick the right one.
"""

from __future__ import annotations

import itertools
import random
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

from dgg.agents.env import StepResult, register_environment
from dgg.agents.search_qa import Retriever
from dgg.errors import UserError, read_json_file

INSTRUCTIONS = ("You are shopping online. Act with one action per reply: search[your query] on the search page, "
                "click[button] to press a button shown in [brackets], and click[buy now] on a product page to buy it.")
ACTION = re.compile(r"\b(search|click)\s*\[([^\]]*)\]", re.IGNORECASE)
STOP_WORDS = frozenset("a an and the of for with in on to by from set pack oz fl x men women kids".split())
SEARCH, RESULTS, ITEM, DETAIL = "search", "results", "item", "detail"


@dataclass(frozen=True)
class Product:
    asin: str
    title: str
    query: str  # the kind of product, as the catalogue's shoppers search for it
    category: str  # "a › b › c"
    price: float
    attributes: tuple[str, ...]
    options: dict[str, tuple[str, ...]] = field(default_factory=dict)
    features: tuple[str, ...] = ()
    description: str = ""

    def text(self) -> str:
        return " ".join([self.title, *self.features, self.description]).lower()


@dataclass(frozen=True)
class Goal:
    asin: str
    instruction: str
    attributes: tuple[str, ...]
    options: dict[str, str]
    price_upper: float


def normalise(text: str) -> str:
    return " ".join("".join(" " if ch in string.punctuation else ch for ch in text.lower()).split())


def type_words(title: str) -> set[str]:
    return {w for w in normalise(title).split() if w not in STOP_WORDS and not w.isdigit()}


def type_reward(bought: Product, wanted: Product) -> float:
    """WebShop's r_type: 1 for the same query, two shared category levels or > 20 % shared title words."""
    shared = len(type_words(bought.title) & type_words(wanted.title)) / max(1, len(type_words(wanted.title)))
    same_category = len({c.strip() for c in bought.category.split("›")} &
                        {c.strip() for c in wanted.category.split("›")}) >= 2
    if shared == 0.0:
        return 0.0
    if shared < 0.1:
        return 0.1
    return 1.0 if bought.query == wanted.query or same_category or shared > 0.2 else 0.5


def _matches(wanted: str, listed: tuple[str, ...], text: str) -> bool:
    wanted = normalise(wanted)
    return any(normalise(item) == wanted for item in listed) or f" {wanted} " in f" {normalise(text)} "


def purchase_reward(bought: Product, wanted: Product, goal: Goal, chosen: dict[str, str]) -> tuple[float, dict]:
    """WebShop's reward for buying ``bought`` with options ``chosen`` when ``goal`` asked for ``wanted``."""
    r_type = type_reward(bought, wanted)
    attributes = sum(_matches(a, bought.attributes, bought.text()) for a in goal.attributes)
    chosen_values = tuple(chosen.values())
    options = sum(normalise(v) in {normalise(c) for c in chosen_values} for v in goal.options.values())
    price_ok = bought.price <= goal.price_upper
    total = (attributes + options + price_ok) / (len(goal.attributes) + len(goal.options) + 1)
    return r_type * total, {"r_type": r_type, "attributes_matched": attributes, "options_matched": options,
                            "price_ok": price_ok}


# -- the generated catalogue --------------------------------------------------------------------------------

KINDS = {  # department › group: product types, attributes, option names and values
    ("clothing", "shoes"): (["running shoes", "rain boots", "hiking sandals", "canvas sneakers"],
                            ["slip resistant", "lightweight", "water resistant", "breathable", "memory foam",
                             "rubber sole", "wide fit"],
                            {"color": ["black", "white", "navy", "grey", "red", "olive"],
                             "size": ["6", "7", "8", "9", "10", "11", "12"]}),
    ("clothing", "tops"): (["cotton t-shirt", "fleece hoodie", "linen shirt", "wool sweater"],
                           ["machine washable", "long sleeve", "relaxed fit", "organic cotton", "quick dry",
                            "button down"],
                           {"color": ["black", "white", "blue", "green", "beige", "maroon"],
                            "size": ["small", "medium", "large", "x-large", "xx-large"]}),
    ("electronics", "audio"): (["wireless earbuds", "bluetooth speaker", "over-ear headphones", "sound bar"],
                               ["noise cancelling", "long battery life", "water resistant", "fast charging",
                                "built-in microphone", "portable"],
                               {"color": ["black", "white", "silver", "blue", "rose gold"]}),
    ("electronics", "accessories"): (["phone charger", "usb-c cable", "power bank", "laptop stand"],
                                     ["fast charging", "braided", "compact", "aluminum", "foldable", "high speed"],
                                     {"color": ["black", "white", "grey"], "length": ["3 ft", "6 ft", "10 ft"]}),
    ("home", "kitchen"): (["coffee mug", "chef knife", "cutting board", "water bottle"],
                          ["dishwasher safe", "bpa free", "stainless steel", "easy clean", "insulated",
                           "non slip"],
                          {"color": ["black", "white", "red", "teal"], "size": ["12 oz", "16 oz", "24 oz"]}),
    ("beauty", "skin care"): (["face moisturizer", "sunscreen lotion", "lip balm", "body wash"],
                              ["paraben free", "cruelty free", "sensitive skin", "fragrance free",
                               "natural ingredients", "long lasting"],
                              {"scent": ["unscented", "lavender", "citrus", "coconut"],
                               "size": ["1.7 fl oz", "3.4 fl oz", "8 fl oz"]}),
}
BRAND_SYLLABLES = ["ka", "lo", "mi", "ren", "to", "va", "sel", "dor", "fi", "nu", "bra", "zen", "qui", "mar"]


def generated_catalogue(seed: int, size: int) -> tuple[list[Product], list[Goal]]:
    """``size`` products and one goal per product, drawn from ``seed``."""
    rng = random.Random(seed)
    brands = sorted({"".join(rng.choice(BRAND_SYLLABLES) for _ in range(2)).capitalize() for _ in range(60)})
    products, goals = [], []
    kinds = sorted(KINDS)
    for number in range(size):
        department, group = kinds[number % len(kinds)]
        types, attribute_pool, option_pool = KINDS[(department, group)]
        kind = rng.choice(types)
        attributes = tuple(rng.sample(attribute_pool, 3))
        options = {name: tuple(sorted(rng.sample(values, min(len(values), rng.randint(2, 4)))))
                   for name, values in option_pool.items()}
        title = f"{rng.choice(brands)} {attributes[0].title()} {kind.title()}"
        price = round(rng.uniform(5, 95), 2)
        features = tuple(f"{a.capitalize()}." for a in attributes)
        asin = "B0" + "".join(rng.choice(string.ascii_uppercase + string.digits) for _ in range(8))
        product = Product(asin, title, kind, f"{department} › {group} › {kind}", price, attributes, options,
                          features, f"A {kind} from {title.split()[0]}: {', '.join(attributes)}.")
        wanted = tuple(rng.sample(attributes, 2))
        choice = {name: rng.choice(values) for name, values in options.items()}
        budget = 10.0 * (int(price // 10) + rng.randint(1, 3))
        wording = ", and ".join(f"{name}: {value}" for name, value in choice.items())
        goals.append(Goal(asin, f"i need a {wanted[0]} and {wanted[1]} {kind} with {wording}, and price lower "
                                f"than {budget:.2f} dollars", wanted, choice, budget))
        products.append(product)
    return products, goals


# -- WebShop's own files ------------------------------------------------------------------------------------

def _price(pricing) -> float:
    numbers = [float(x) for x in re.findall(r"\d+(?:\.\d+)?", str(pricing or "").replace(",", ""))]
    return numbers[0] if numbers else 100.0  # WebShop prices an unpriced product at $100


def load_webshop_files(products_path: str, attributes_path: str) -> tuple[list[Product], list[Goal]]:
    """Products from WebShop's ``items_shuffle*.json`` and goals from its ``items_ins_v2*.json``, built like its
    synthetic goals: the instruction, one goal per combination of option values, a budget above the price."""
    raw = read_json_file(products_path, "task.options.products")
    annotations = read_json_file(attributes_path, "task.options.attributes")
    if not isinstance(raw, list) or not isinstance(annotations, dict):
        raise UserError(f"task.options: {products_path} must hold a JSON list of products and {attributes_path} "
                        "a JSON object keyed by asin, as WebShop's own files do")
    products, goals, seen = [], [], set()
    rng = random.Random(0)
    for number, item in enumerate(raw):
        if not isinstance(item, dict) or "asin" not in item or "name" not in item:
            raise UserError(f"{products_path}: product {number} needs at least 'asin' and 'name'")
        asin = str(item["asin"])
        if asin in seen or asin == "nan" or len(asin) > 10:
            continue
        seen.add(asin)
        options = {str(name).lower(): tuple(str(v.get("value", "")).strip().replace("/", " | ").lower()
                                            for v in values if isinstance(v, dict))
                   for name, values in (item.get("customization_options") or {}).items() if values}
        bullets = item.get("small_description") or []
        note = annotations.get(asin) or {}
        product = Product(asin, str(item["name"]), str(item.get("query", "")).lower().strip(),
                          str(item.get("product_category", "")), _price(item.get("pricing")),
                          tuple(note.get("attributes") or ()), options,
                          tuple(bullets if isinstance(bullets, list) else [bullets]),
                          str(item.get("full_description") or ""))
        products.append(product)
        if not note.get("instruction") or not note.get("instruction_attributes"):
            continue
        above = [10.0 * i for i in range(1, 100) if 10.0 * i > product.price][:4]
        budget = sorted(rng.sample(above, 2))[1] if len(above) >= 2 else 1e6
        for combination in itertools.product(*(options[name] for name in sorted(options))):
            choice = dict(zip(sorted(options), combination))
            wording = "".join(f", and {k}: {v}" for k, v in choice.items()).replace(", and ", " with ", 1)
            price_text = f", and price lower than {budget:.2f} dollars" if budget < 1e6 else ""
            goals.append(Goal(asin, f"{note['instruction'].strip('.')}{wording}{price_text}",
                              tuple(note["instruction_attributes"]), choice, budget))
    if not goals:
        raise UserError(f"task.options: no goals in {attributes_path} match a product of {products_path}")
    return products, goals


_SHOPS: dict[tuple, tuple[list[Product], list[Goal], Retriever]] = {}


def _shop(catalogue_seed: int, size: int, products: str | None, attributes: str | None):
    key = (catalogue_seed, size, products, attributes,
           *(Path(p).stat().st_mtime_ns for p in (products, attributes) if p and Path(p).is_file()))
    if key not in _SHOPS:
        if products is not None:
            catalogue, goals = load_webshop_files(products, attributes)
        else:
            catalogue, goals = generated_catalogue(catalogue_seed, size)
        _SHOPS[key] = (catalogue, goals, Retriever([" ".join([p.title, *p.attributes, p.query]) for p in catalogue]))
    return _SHOPS[key]


@register_environment("webshop")
class WebShop:
    """One goal per episode, drawn from the seed; the episode ends at ``click[buy now]`` or the turn limit."""

    def __init__(self, products_count: int = 120, catalogue_seed: int = 0, results_per_page: int = 5,
                 search_results: int = 20, products: str | None = None, attributes: str | None = None,
                 show_goal_every_page: bool = True, start_on_results: bool = False, untagged: str = "invalid",
                 options_in_goal: bool = True, buy_on_open: bool = False):
        for name, value, least in (("products_count", products_count, 6), ("results_per_page", results_per_page, 1),
                                   ("search_results", search_results, 1)):
            if not isinstance(value, int) or value < least:
                raise UserError(f"task.options.{name} must be an integer >= {least} (got {value!r})")
        if untagged not in ("invalid", "lenient"):
            raise UserError(f"task.options.untagged must be invalid or lenient (got {untagged!r})")
        if (products is None) != (attributes is None):
            raise UserError("task.options: products and attributes come together (WebShop's items_shuffle*.json "
                            "and items_ins_v2*.json)")
        self.catalogue, self.goals, self.retriever = _shop(catalogue_seed, products_count, products, attributes)
        self.by_asin = {p.asin: p for p in self.catalogue}
        self.per_page, self.search_results, self.show_goal = results_per_page, search_results, show_goal_every_page
        if not options_in_goal:  # the goal asks for the product and the budget only
            self.goals = [Goal(g.asin, re.sub(r" with .*?(?=, and price lower than|$)", "", g.instruction),
                               g.attributes, {}, g.price_upper) for g in self.goals]
        self.start_on_results, self.lenient, self.buy_on_open = start_on_results, untagged == "lenient", buy_on_open
        self.goal: Goal | None = None

    def reset(self, seed: int) -> str:
        self.goal = self.goals[random.Random(seed).randrange(len(self.goals))]
        self.page, self.hits, self.result_page, self.item, self.chosen = SEARCH, [], 1, None, {}
        if self.start_on_results:  # an easier level: the instruction has already been searched
            self._search(self.goal.instruction)
        return f"{INSTRUCTIONS}\nInstruction: {self.goal.instruction}\n{self._render(with_goal=False)}"

    def _search(self, query: str) -> None:
        self.hits, self.result_page, self.page = self.retriever.ranked(query, self.search_results), 1, RESULTS

    def _untagged(self, reply: str) -> str | None:
        """The lenient reading of a reply with no action: a query on the search page, else the button it names
        first (the longest, where two start at the same place)."""
        if self.page == SEARCH:
            return f"search[{reply.strip()}]" if normalise(reply) else None
        text = reply.lower()
        found = [(text.find(b.lower()), -len(b), b) for b in self.buttons() if b.lower() in text]
        return f"click[{min(found)[2]}]" if found else None

    # -- pages --

    def buttons(self) -> list[str]:
        """What ``click[...]`` accepts on the current page (none on the search page)."""
        if self.page == RESULTS:
            shown = self._shown()
            return (["back to search"] + (["< prev"] if self.result_page > 1 else []) +
                    (["next >"] if self.result_page * self.per_page < len(self.hits) else []) + [p.asin for p in shown])
        if self.page == ITEM:
            return ["back to search", "< prev", *(v for values in self.item.options.values() for v in values),
                    "description", "features", "buy now"]
        if self.page == DETAIL:
            return ["back to search", "< prev"]
        return []

    def _shown(self) -> list[Product]:
        start = (self.result_page - 1) * self.per_page
        return [self.catalogue[i] for i in self.hits[start:start + self.per_page]]

    def _render(self, detail: str = "", with_goal: bool = True) -> str:
        head = f"Instruction: {self.goal.instruction}\n" if with_goal and self.show_goal and self.page != SEARCH else ""
        if self.page == SEARCH:
            return "[Search] (reply search[your query])"
        if self.page == RESULTS:
            rows = "\n".join(f"[{p.asin}] {p.title} ${p.price:.2f}" for p in self._shown()) or "No results."
            pages = f"Page {self.result_page} of {max(1, -(-len(self.hits) // self.per_page))}"
            nav = " ".join(f"[{b}]" for b in self.buttons() if b in ("back to search", "< prev", "next >"))
            return f"{head}{nav}\n{pages}\n{rows}"
        if self.page == ITEM:
            p = self.item
            options = "\n".join(f"{name}: " + " ".join(f"[{v}]" for v in values) for name, values in p.options.items())
            picked = ", ".join(f"{k}: {v}" for k, v in self.chosen.items()) or "none"
            return (f"{head}[back to search] [< prev]\n{p.title}\nPrice: ${p.price:.2f}\n{options}\n"
                    f"Chosen options: {picked}\n[description] [features] [buy now]").replace("\n\n", "\n")
        return f"{head}[back to search] [< prev]\n{detail}"

    def _invalid(self, why: str) -> StepResult:
        buttons = self.buttons()
        allowed = "search[your query]" if self.page == SEARCH else ", ".join(f"click[{b}]" for b in buttons)
        return StepResult(f"Invalid action: {why}. Valid actions here: {allowed}.\n{self._render()}", 0.0, False,
                          {"invalid": True})

    def step(self, action: str) -> StepResult:
        if self.goal is None:
            raise RuntimeError("step before reset")
        found = ACTION.search(action)
        if found is None and self.lenient and (reading := self._untagged(action)) is not None:
            found = ACTION.search(reading)
        if found is None:
            return self._invalid("write one action, search[query] or click[button]")
        verb, argument = found.group(1).lower(), found.group(2).strip()
        if verb == "search":
            if self.page != SEARCH:
                return self._invalid("search only works on the search page (click[back to search] first)")
            if not normalise(argument):
                return self._invalid("the query is empty")
            self._search(argument)
            return StepResult(self._render())
        buttons = {b.lower(): b for b in self.buttons()}
        button = buttons.get(argument.lower())
        if button is None:
            return self._invalid(f"there is no button [{argument}] on this page")
        return self._click(button)

    def _click(self, button: str) -> StepResult:
        if button == "back to search":
            self.page, self.item, self.chosen = SEARCH, None, {}
        elif button == "next >":
            self.result_page += 1
        elif button == "< prev":
            if self.page == RESULTS:
                self.result_page -= 1
            else:
                self.page = RESULTS if self.page == ITEM else ITEM
                self.chosen = self.chosen if self.page == ITEM else {}
        elif self.page == RESULTS:
            self.page, self.item, self.chosen = ITEM, self.by_asin[button], {}
            if self.buy_on_open:
                return self._click("buy now")
        elif button == "buy now":
            score, info = purchase_reward(self.item, self.by_asin[self.goal.asin], self.goal, self.chosen)
            return StepResult("", score, True, {**info, "success": score == 1.0, "bought": self.item.asin})
        elif button in ("description", "features"):
            self.page = DETAIL
            text = self.item.description if button == "description" else "\n".join(self.item.features)
            return StepResult(self._render(text or "(none)"))
        else:  # an option value
            name = next(n for n, values in self.item.options.items() if button in values)
            self.chosen[name] = button
        return StepResult(self._render())

    def expert_action(self, step: int) -> str:
        """The next reply of a policy that knows the goal's product (tests): search its title, open it, pick each
        option, buy."""
        assert self.goal is not None
        target = self.by_asin[self.goal.asin]
        plan = [f"search[{target.title}]", f"click[{target.asin}]", *(f"click[{v}]" for v in self.goal.options.values()),
                "click[buy now]"]
        return plan[min(step, len(plan) - 1)]
