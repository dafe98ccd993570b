"""``alfworld``: household tasks in ALFWorld's own text engine (Shridhar et al., 2021), on generated rooms.

The engine is ALFWorld's: its PDDL domain (``alfred.pddl``) and text grammar (``alfred.twl2``) played by
TextWorld's PDDL environment, with ALFWorld's name demangling ("apple 1", "cabinet 3"), its commands
("go to fridge 1", "open fridge 1", "take apple 1 from fridge 1", "heat apple 1 with microwave 1",
"move apple 1 to countertop 1", "use desklamp 1", ...), its "Nothing happens." for a command that does not
apply, and its success signal as the reward (1 when the goal holds, and the episode ends).

ALFWorld's game files are a separate download, so by default each episode seed generates a room: receptacles
of a kitchen, living room, bedroom or bathroom (``receptacles`` of them), the task's objects and
``distractors`` other objects placed where ALFWorld's object tables allow, and one of ALFWorld's six task types
with its PDDL goal and a templated description from ALFWorld's goal library. ``games`` points to a folder of
the real game files (``.../json_2.1.1/train``) instead: every ``game.tw-pddl`` beside a ``traj_data.json`` of an
allowed task type, as ALFWorld collects them.

Easier levels for small models: ``show_admissible: true`` lists the commands that apply after every
observation (as many LLM-agent set-ups of ALFWorld do); ``lenient: true`` reads a reply that is not a
command as the first admissible command it contains, and ``lenient: closest`` as the admissible command that
shares the most of its words with the reply (free text mapped onto the admissible actions, as Huang et al.,
2022, do with sentence embeddings); ``hint: first`` or ``hint: every`` names the planner expert's next command
in the first or in every observation.
"""

from __future__ import annotations

import functools
import json
import random
import re
from pathlib import Path

from dgg.agents.env import StepResult, register_environment
from dgg.errors import UserError

TASK_TYPES = ("pick_and_place_simple", "look_at_obj_in_light", "pick_clean_then_place_in_recep",
              "pick_heat_then_place_in_recep", "pick_cool_then_place_in_recep", "pick_two_obj_and_place")
APPLIANCE = {"pick_clean_then_place_in_recep": ("SinkBasin", "Cleanable"),
             "pick_heat_then_place_in_recep": ("Microwave", "Heatable"),
             "pick_cool_then_place_in_recep": ("Fridge", "Coolable")}
LAMPS_ON = ("Desk", "SideTable", "Dresser")

# Receptacle types of each kind of room (repeats are separate instances: cabinet 1, cabinet 2, ...), in the
# order they are kept when ``receptacles`` is small, and the objects that may lie about in it.
ROOMS = {
    "kitchen": (["CounterTop", "Fridge", "Microwave", "SinkBasin", "Cabinet", "DiningTable", "Drawer",
                 "StoveBurner", "Cabinet", "Shelf", "GarbageCan", "Drawer", "CoffeeMachine", "Cabinet",
                 "CounterTop", "Drawer", "Cabinet"],
                ["Apple", "Bread", "Egg", "Lettuce", "Potato", "Tomato", "Mug", "Cup", "Bowl", "Plate", "Pan", "Pot",
                 "Kettle", "Fork", "Spoon", "Knife", "ButterKnife", "Spatula", "Ladle", "DishSponge", "SaltShaker",
                 "PepperShaker", "SoapBottle", "WineBottle"]),
    "livingroom": (["SideTable", "Sofa", "CoffeeTable", "Shelf", "ArmChair", "Drawer", "Cabinet", "Dresser",
                    "GarbageCan", "Shelf", "Drawer", "Ottoman", "Cabinet", "Shelf"],
                   ["Book", "CellPhone", "CreditCard", "KeyChain", "RemoteControl", "Newspaper", "Pillow", "Laptop",
                    "Statue", "Vase", "Watch", "Box", "Candle"]),
    "bedroom": (["Desk", "Bed", "SideTable", "Dresser", "Drawer", "Shelf", "GarbageCan", "Drawer", "Safe",
                 "Shelf", "Drawer", "LaundryHamper", "Shelf"],
                ["Book", "CD", "CellPhone", "CreditCard", "KeyChain", "Pen", "Pencil", "AlarmClock", "Pillow",
                 "Laptop", "Watch", "Cloth", "BasketBall", "TennisRacket"]),
    "bathroom": (["CounterTop", "SinkBasin", "Toilet", "Cabinet", "BathtubBasin", "Drawer", "Shelf", "GarbageCan",
                  "Cabinet", "TowelHolder", "HandTowelHolder", "ToiletPaperHanger", "Cabinet", "Drawer"],
                 ["SoapBar", "SoapBottle", "SprayBottle", "ToiletPaper", "Cloth", "Towel", "HandTowel", "Candle",
                  "DishSponge", "TissueBox", "Plunger"]),
}
ROOMS_OF_TASK = {"pick_clean_then_place_in_recep": ("kitchen", "bathroom"),
                 "pick_heat_then_place_in_recep": ("kitchen",), "pick_cool_then_place_in_recep": ("kitchen",),
                 "look_at_obj_in_light": ("livingroom", "bedroom")}
NOT_GOALS = {"Microwave", "StoveBurner", "CoffeeMachine", "GarbageCan", "Toaster"}  # ALFWorld never asks for these
COMMAND = re.compile(r"^(go to|open|close|take|move|put|use|heat|cool|clean|slice|examine|inventory|look|help)\b")
INSTRUCTIONS = ("You are in a household text game. Reply with exactly one command per turn, for example: "
                "go to fridge 1, open fridge 1, take apple 1 from fridge 1, heat apple 1 with microwave 1, "
                "move apple 1 to countertop 1, use desklamp 1, look, inventory.")
HINT = " Write one command per reply, such as: go to countertop 1 (help lists the commands)."
READINGS = (False, True, "closest")
HINTS = ("none", "first", "every")


def _alfworld():
    try:
        import alfworld.gen.constants as constants
        import alfworld.gen.goal_library as goals
        import textworld
        from alfworld.agents.environment.alfred_tw_env import AlfredDemangler
        from textworld.envs.pddl import PddlEnv
    except ImportError as err:
        raise UserError("the alfworld environment needs ALFWorld's engine: pip install 'dgg[agents]' "
                        f"(alfworld); {err}") from err
    return constants, goals, textworld, AlfredDemangler, PddlEnv


@functools.lru_cache(maxsize=16)
def parsed_logic(domain: str, grammar: str):
    """TextWorld's GameLogic for a domain and grammar, parsed once: the G episodes of a group (and the prompt's
    own reset) play the same game, and parsing the grammar was most of a reset. Play never mutates it."""
    from textworld.envs.pddl.logic import GameLogic

    return GameLogic(domain=domain, grammar=grammar)


@functools.lru_cache(maxsize=16)
def initial_entities(domain: str, grammar: str, problem: str) -> tuple[tuple[str, str], ...]:
    """(id, type) of every entity in a problem's initial facts, in the order PddlEnv lists them (the demangler's
    numbering follows it), from one throwaway PDDL state."""
    from fast_downward import load_lib
    from textworld.envs.pddl.logic import PddlState

    state = PddlState(load_lib(), problem, parsed_logic(domain, grammar))
    return tuple({v.name: (v.name, v.type) for fact in state.facts for v in fact.arguments}.values())


@functools.lru_cache(maxsize=1)
def shared_logic_engine():
    """TextWorld's PddlEnv with a cheaper ``load``: the stock one parses the grammar and builds a PDDL state only to
    list the entities, and ``reset`` then builds the state again. Here the logic and the entity list are parsed
    once per game, and the state is built once, by ``reset``."""
    from textworld.generator.game import EntityInfo

    pddl_env = _alfworld()[4]

    class SharedLogicPddlEnv(pddl_env):
        def load(self, data: dict) -> None:
            self._game_file, self._game_data = None, data
            self.walkthrough = data.get("walkthrough")
            self._logic = parsed_logic(data["pddl_domain"], data["grammar"])
            self._entity_infos = {}
            for name, kind in initial_entities(data["pddl_domain"], data["grammar"], data["pddl_problem"]):
                info = self._entity_infos[name] = EntityInfo(name, kind)
                info.name, info.definite, info.indefinite = name, "the", "a"  # as PddlEnv._get_entity_infos

    return SharedLogicPddlEnv


@functools.lru_cache(maxsize=1)
def game_logic() -> tuple[str, str]:
    """ALFWorld's PDDL domain and text grammar, as its wheel ships them."""
    import importlib.resources

    _alfworld()
    data = importlib.resources.files("alfworld") / "data"
    return (data / "alfred.pddl").read_text(), (data / "alfred.twl2").read_text()


def mangled(kind: str, rng: random.Random) -> str:
    """An ALFWorld object id (``Apple_bar__minus_00_dot_47_bar_...``) at a random position; sinks and bathtubs
    are ``Sink|x|y|z|SinkBasin`` there, which the demangler names ``sinkbasin``."""
    def coordinate(value: float) -> str:
        return ("_minus_" if value < 0 else "_plus_") + f"{abs(value):05.2f}".replace(".", "_dot_")

    base = {"SinkBasin": "Sink", "BathtubBasin": "Bathtub"}.get(kind, kind)
    text = base + "".join("_bar_" + coordinate(rng.uniform(-3, 3)) for _ in range(3))
    return text + f"_bar_{kind}" if base != kind else text


def generate_problem(seed: int, task_types=TASK_TYPES, receptacles: int = 8, distractors: int = 4) -> dict:
    """One solvable ALFWorld problem from ``seed``: ``{"pddl_problem", "task", "task_type"}``."""
    constants, goals, *_ = _alfworld()
    holds = {kind: set(objects) for kind, objects in constants.VAL_RECEPTACLE_OBJECTS.items()}
    rng = random.Random(seed)
    for _ in range(100):  # a draw whose task cannot be set in the room is drawn again (deterministically)
        task_type = rng.choice(list(task_types))
        room = rng.choice(ROOMS_OF_TASK.get(task_type, tuple(ROOMS)))
        room_receptacles, room_objects = ROOMS[room]
        appliance, ability = APPLIANCE.get(task_type, (None, None))
        able = set(constants.VAL_ACTION_OBJECTS[ability]) if ability else set(room_objects)
        targets = [o for o in room_objects if o in able]
        if not targets:
            continue
        target = rng.choice(targets)
        kinds = room_receptacles[:max(receptacles, 2)]
        if appliance and appliance not in kinds:
            kinds = [appliance, *kinds[:-1]]
        if task_type == "look_at_obj_in_light" and not set(kinds) & set(LAMPS_ON):
            kinds = [rng.choice([k for k in LAMPS_ON if k in room_receptacles]), *kinds[:-1]]
        goal_kinds = sorted({k for k in kinds if k not in NOT_GOALS and k != appliance and target in holds.get(k, ())})
        goal = rng.choice(goal_kinds) if goal_kinds and task_type != "look_at_obj_in_light" else None
        sources = [i for i, k in enumerate(kinds) if target in holds.get(k, ()) and k != goal and k != appliance]
        if (goal is None and task_type != "look_at_obj_in_light") or not sources:
            continue
        break
    else:
        raise UserError(f"task.options: no {', '.join(task_types)} task fits in {receptacles} receptacles")

    ids = [mangled(kind, rng) for kind in kinds]
    locations = [f"loc_bar_{i + 1}_bar_{rng.randrange(-9, 10)}_bar_{rng.randrange(4)}_bar_{rng.choice((0, 30, 45, 60))}"
                 for i in range(len(kinds))]
    start = "loc_bar_0_bar_0_bar_0_bar_0"
    init = [f"(atLocation agent1 {start})", "(= (total-cost) 0)"]
    for rid, kind, location in zip(ids, kinds, locations):
        init += [f"(receptacleType {rid} {kind}Type)", f"(receptacleAtLocation {rid} {location})"]
        if kind in constants.OPENABLE_CLASS_LIST:
            init.append(f"(openable {rid})")
    placed: list[tuple[str, str]] = []  # (object id, kind)

    def place(kind: str, where: list[int], pickupable: bool = True) -> None:
        oid, spot = mangled(kind, rng), rng.choice(where)
        placed.append((oid, kind))
        init.extend([f"(objectType {oid} {kind}Type)", f"(inReceptacle {oid} {ids[spot]})",
                     f"(objectAtLocation {oid} {locations[spot]})"])
        if pickupable:
            init.append(f"(pickupable {oid})")
        for ability_name, predicate in (("Heatable", "heatable"), ("Coolable", "coolable"),
                                        ("Cleanable", "cleanable"), ("Sliceable", "sliceable")):
            if kind in constants.VAL_ACTION_OBJECTS[ability_name]:
                init.append(f"({predicate} {oid})")

    for _ in range(2 if task_type == "pick_two_obj_and_place" else 1):
        place(target, sources)
    lamp = None
    if task_type == "look_at_obj_in_light":
        lamp = "DeskLamp"
        place(lamp, [i for i, k in enumerate(kinds) if k in LAMPS_ON], pickupable=False)
        init.append(f"(toggleable {placed[-1][0]})")
    others = [o for o in room_objects if o != target]
    for _ in range(distractors):
        kind = rng.choice(others)
        where = [i for i, k in enumerate(kinds) if kind in holds.get(k, ()) and k != goal]
        if where:
            place(kind, where)
    object_kinds = sorted({k for _, k in placed})
    init += [f"(canContain {kind}Type {o}Type)" for kind in sorted(set(kinds)) for o in object_kinds
             if o in holds.get(kind, ())]
    declarations = ["agent1 - agent", *(f"{k}Type - otype" for k in object_kinds),
                    *(f"{k}Type - rtype" for k in sorted(set(kinds))), *(f"{oid} - object" for oid, _ in placed),
                    *(f"{rid} - receptacle" for rid in ids), *(f"{loc} - location" for loc in [start, *locations])]
    names = {"obj": target, "recep": goal or "", "toggle": lamp or "", "mrecep": ""}
    goal_pddl = goals.gdict[task_type]["pddl"].format(**names).replace("#", "-")
    problem = (f"(define (problem dgg_{seed})\n(:domain alfred)\n(:objects\n" + "\n".join(declarations) +
               "\n)\n(:init\n" + "\n".join(init) + "\n)\n" + goal_pddl)
    template = rng.choice(goals.gdict[task_type]["templates"])
    task = template.format(**{k: v.lower() for k, v in names.items()})
    return {"pddl_problem": problem, "task": task, "task_type": task_type}


def words(text: str) -> set[str]:
    """Lower-case words and numbers: "Go to the Fridge 1." -> {"go", "to", "the", "fridge", "1"}."""
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def closest_command(reply: str, commands: list[str]) -> str | None:
    """The command with the largest share of its words in ``reply`` (the first on a tie); None when no command
    shares a word with it."""
    said = words(reply)
    shares = [(len(said & words(c)) / len(words(c)), c) for c in commands]
    share, best = max(shares, key=lambda pair: pair[0], default=(0, None))  # max keeps the first on a tie
    return best if share > 0 else None


@functools.lru_cache(maxsize=8)  # every episode builds its own environment: walk a folder of thousands of games once
def collect_games(folder: str, task_types: tuple[str, ...]) -> tuple[str, ...]:
    """ALFWorld's game files under ``folder``: a ``game.tw-pddl`` beside a ``traj_data.json`` of an allowed task
    type, solvable, and neither movable nor sliced (which ALFWorld's text engine does not support)."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"task.options.games: {folder} is not a folder (point it to ALFWorld's json_2.1.1/train "
                        "or any folder of game.tw-pddl files beside their traj_data.json)")
    games = []
    for trajectory in sorted(root.rglob("traj_data.json")):
        game = trajectory.parent / "game.tw-pddl"
        if "movable" in str(trajectory.parent) or "Sliced" in str(trajectory.parent) or not game.is_file():
            continue
        try:
            task_type = json.loads(trajectory.read_text())["task_type"]
            solvable = json.loads(game.read_text()).get("solvable", True)
        except (OSError, ValueError, KeyError) as err:
            raise UserError(f"task.options.games: cannot read {trajectory} or its game.tw-pddl: {err}") from err
        if task_type in task_types and solvable:
            games.append(str(game))
    if not games:
        raise UserError(f"task.options.games: no game.tw-pddl of task types {', '.join(task_types)} under {folder}")
    return tuple(games)


@register_environment("alfworld")
class ALFWorld:
    def __init__(self, task_types=TASK_TYPES, receptacles: int = 8, distractors: int = 4, games: str | None = None,
                 show_admissible: bool = False, lenient: bool | str = False, hint: str = "none"):
        task_types = [task_types] if isinstance(task_types, str) else list(task_types)
        unknown = [t for t in task_types if t not in TASK_TYPES]
        if unknown or not task_types:
            raise UserError(f"task.options.task_types: {unknown or 'empty'}; allowed: {', '.join(TASK_TYPES)}")
        if not isinstance(receptacles, int) or not 2 <= receptacles <= 14:
            raise UserError(f"task.options.receptacles must be an integer from 2 to 14 (got {receptacles!r})")
        if not isinstance(distractors, int) or not 0 <= distractors <= 30:
            raise UserError(f"task.options.distractors must be an integer from 0 to 30 (got {distractors!r})")
        if lenient not in READINGS:
            raise UserError(f"task.options.lenient must be false, true or closest (got {lenient!r})")
        if hint not in HINTS:
            raise UserError(f"task.options.hint must be one of {', '.join(HINTS)} (got {hint!r})")
        _, _, textworld, demangler, _ = _alfworld()
        self.task_types, self.receptacles, self.distractors = task_types, receptacles, distractors
        self.show_admissible, self.lenient, self.hint = bool(show_admissible), lenient, hint
        self.games = collect_games(games, tuple(task_types)) if games else None
        self._domain, self._grammar = game_logic()
        self._engine = shared_logic_engine()(textworld.EnvInfos(won=True, admissible_commands=True))
        self._env = demangler(self._engine)
        self._state = None
        self.task_type = None

    def _game(self, seed: int) -> dict:
        if self.games:
            path = random.Random(seed).choice(self.games)
            game = json.loads(Path(path).read_text())
            task_type = json.loads((Path(path).parent / "traj_data.json").read_text())["task_type"]
            return {**game, "task_type": task_type}
        problem = generate_problem(seed, self.task_types, self.receptacles, self.distractors)
        return {"pddl_domain": self._domain, "grammar": self._grammar.replace("UNKNOWN GOAL", problem["task"]),
                "pddl_problem": problem["pddl_problem"], "task_type": problem["task_type"]}

    def reset(self, seed: int) -> str:
        game = self._game(seed)
        self.task_type = game.pop("task_type")
        self._env.load(game)
        self._state = self._env.reset()
        return f"{INSTRUCTIONS}\n\n{self._observe(self._state.feedback, first=True)}"

    def admissible(self) -> list[str]:
        return [c for c in self._state["admissible_commands"] if c != "help"]

    def expert_plan(self) -> list[str]:
        """The planner's commands from the current state to the goal (ALFWorld's planner expert)."""
        return list(self._engine._pddl_state.replan(self._engine._entity_infos))  # 0.4 ms (2 receptacles) to 1.5 ms (8)

    def _observe(self, feedback: str, first: bool = False) -> str:
        feedback = feedback.strip()
        if self.show_admissible:
            feedback += "\nAdmissible commands: " + ", ".join(self.admissible()) + "."
        if self.hint == "every" or (self.hint == "first" and first):
            plan = self.expert_plan()
            if plan:
                feedback += f"\nHint: {plan[0]}."
        return feedback

    def read_command(self, reply: str) -> str | None:
        """The command a reply gives: its first line, less a leading ``>`` or ``Action:`` and a final full stop;
        with ``lenient``, else the first admissible command written anywhere in it; with ``lenient: closest``,
        else the admissible command with the largest share of its words in the reply (the first listed on a tie)."""
        line = next((x for x in reply.strip().splitlines() if x.strip()), "")
        line = re.sub(r"^\s*(>|action:|command:)\s*", "", line.strip(), flags=re.IGNORECASE)
        command = " ".join(line.rstrip(".!").lower().split())
        commands = self._state["admissible_commands"]
        if command in commands or not self.lenient:
            return command
        text = " ".join(reply.lower().split())
        found = [(text.find(c), -len(c), c) for c in commands if c in text]
        if found:
            return min(found)[2]
        if self.lenient == "closest":
            return closest_command(reply, self.admissible()) or command
        return command

    def step(self, action: str) -> StepResult:
        if self._state is None:
            raise RuntimeError("step before reset")
        command = self.read_command(action)
        valid = command in self._state["admissible_commands"]
        self._state, score, done = self._env.step(command if valid else "")
        feedback = self._state.feedback
        if not valid and not COMMAND.match(command):
            feedback += HINT
        won = bool(self._state["won"])
        return StepResult(self._observe(feedback), float(won), won or bool(done),
                          {"invalid": not valid, "won": won, "task_type": self.task_type})
