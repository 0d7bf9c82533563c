"""The declarations: every parameter reaches the request once, with one default; every mode is one record that
the API, the command line, the page and the engine read; one seed rule on every front end."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from instantid.declaration import DERIVED, GATHERED, MODE_SPECS, MODES, PARAMS, Mode, Param, params_for
from instantid.request import requests
from instantid.request.requests import Request, _check_declaration

BOGUS = Param("eta", "number", 0.0, "A parameter nothing takes.", "Eta", lo=0, hi=10)


def test_every_parameter_is_a_request_field_with_its_declared_default() -> None:
    _check_declaration(PARAMS, Request)  # what the import ran
    fields = {f.name: f for f in dataclasses.fields(Request)}
    for name, param in PARAMS.items():
        if name in GATHERED:
            assert GATHERED[name] in fields, name
        else:
            assert fields[name].default == param.default, name
    assert set(fields) - set(PARAMS) == set(DERIVED)
    # The default request is the declaration's, checked: automatic steps, guidance and seed; no extra ControlNet.
    request = Request(face_images=["face.png"])
    assert (request.num_steps, request.guidance_scale, request.seed, request.controlnets) == (None, None, None, {})


def test_a_declaration_nothing_takes_fails_the_check() -> None:
    with pytest.raises(TypeError, match="parameter eta is declared but Request has no field for it"):
        _check_declaration({**PARAMS, "eta": BOGUS}, Request)
    # A default written twice that drifted apart.
    drifted = dataclasses.replace(PARAMS["adapter_strength"], default=0.7)
    with pytest.raises(TypeError, match="adapter_strength: Request's default 0.8 is not the declared 0.7"):
        _check_declaration({**PARAMS, "adapter_strength": drifted}, Request)
    # A request field with no declaration.
    extra = dataclasses.make_dataclass("Wider", [("eta", float, 0.0)], bases=(Request,), frozen=True)
    with pytest.raises(TypeError, match="Wider.eta is no declared parameter"):
        _check_declaration(PARAMS, extra)
    # A parameter of a mode nobody declared.
    stray = dataclasses.replace(PARAMS["prompt"], modes=(*MODES, "inpaint"))
    with pytest.raises(TypeError, match="prompt names mode 'inpaint'"):
        _check_declaration({**PARAMS, "prompt": stray}, Request)


def test_from_api_never_drops_a_declared_parameter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Declared after the import's check (as a test can): the value is refused loudly, never accepted and lost."""
    monkeypatch.setitem(requests.PARAMS, "eta", BOGUS)
    with pytest.raises(TypeError, match="eta"):
        Request.from_api({"face_image": "face.png", "prompt": "", "eta": 7})


def test_each_gathered_parameter_reaches_its_field() -> None:
    extras = ["b.png", {"path": "c.png"}]
    one = Request.from_api({"face_image": "a.png", "prompt": "", "extra_face_images": extras})
    assert one.face_images == ["a.png", "b.png", "c.png"]
    group = Request.from_api({"person_1": "a.png", "person_2": ["b.png"], "person_4": ["d.png"], "prompt": "",
                                      "person_3": ["c.png", "e.png"]}, "group")
    assert group.people == [["a.png"], ["b.png"], ["c.png", "e.png"], ["d.png"]]
    randomized = Request.from_api({"face_image": "a.png", "prompt": "", "seed": 5, "randomize_seed": True})
    assert randomized.seed is None
    assert set(GATHERED) <= set(PARAMS)


# --- modes --------------------------------------------------------------------------------------------------


def test_each_mode_is_one_record() -> None:
    assert MODES == ("generate", "restyle", "swap", "group") == tuple(m.name for m in MODE_SPECS.values())
    for mode in MODE_SPECS.values():
        if mode.photo:  # its own photo: a required photo that this mode alone takes
            param = PARAMS[mode.photo]
            assert param.kind == "image" and param.required and param.modes == (mode.name,), mode.name
            with pytest.raises(requests.UserError, match=f"add {mode.photo_what} \\(API: {mode.photo}\\)"):
                Request(face_images=["face.png"], mode=mode.name)
        # Extra ControlNets: exactly the modes whose record labels them.
        assert (mode.name in PARAMS["controlnets"].modes) == bool(mode.controls_label)
        # refine_faces "auto" means the record's default.
        request = Request(mode=mode.name, face_images=["face.png"], people=[["a.png"], ["b.png"]] if
                                  mode.people else (), **({mode.photo: "photo.png"} if mode.photo else {}))
        assert request.refines is (mode.refines and mode.name in PARAMS["refine_faces"].modes)
    with pytest.raises(requests.InvalidParameter, match="mode='paint': choose one of generate, restyle, swap, group"):
        Request(face_images=["face.png"], mode="paint")
    with pytest.raises(ValueError, match="pipeline 'video' is not one of"):
        Mode("x", "X", "X", "", "", "", "video")
    with pytest.raises(ValueError, match="before_after needs a photo"):
        Mode("x", "X", "X", "", "", "", "base", before_after=True)


def test_the_front_ends_read_the_records() -> None:
    from instantid.frontends import api
    from instantid.frontends.cli import _parser

    assert list(api.ENDPOINTS) == list(MODES)
    commands = _parser().commands
    for name, mode in MODE_SPECS.items():
        endpoint = api.ENDPOINTS[name]
        assert getattr(api, name) is endpoint and endpoint.__name__ == name
        assert endpoint.__doc__.startswith(mode.summary)
        assert list(inspect.signature(endpoint).parameters)[:-1] == list(params_for(name))
        assert commands[name].prog.endswith(name)
    helps = _parser().format_help()
    assert all(mode.command_help in " ".join(helps.split()) for mode in MODE_SPECS.values())


def test_every_mode_has_its_scene_in_the_engine() -> None:
    from instantid.request import scenes
    from instantid.request.scenes import SCENES

    assert set(SCENES) == set(MODES)
    assert all(callable(scene) and getattr(scenes, scene.__name__) is scene for scene in SCENES.values())


# --- the seed ----------------------------------------------------------------------------------------------------


def test_no_seed_given_is_a_random_seed_everywhere() -> None:
    """One rule: a seed not given is a random one (the engine draws it; the seed used is returned)."""
    from instantid.frontends import api
    from instantid.frontends.cli import _parser

    assert PARAMS["seed"].default is None and Request(face_images=["a.png"]).seed is None
    assert Request.from_api({"face_image": "a.png", "prompt": ""}).seed is None
    assert Request.from_api({"face_image": "a.png", "prompt": "", "seed": 0}).seed == 0  # 0 is a seed
    for mode in MODES:
        assert inspect.signature(api.ENDPOINTS[mode]).parameters["seed"].default is None
    args = _parser().parse_args(["generate", "--face", "a.png", "--out", "o.png"])
    assert args.seed is None and args.randomize_seed is False


@pytest.mark.parametrize(("names", "people", "expected"), [
    ("Ada, Ben,", 2, ("Ada", "Ben")),  # a trailing comma: no third person
    ("Ada, Ben,,, ", 2, ("Ada", "Ben")),
    ("Ada,,Ben", 3, ("Ada", "Person 2", "Ben")),  # a doubled comma: that person's default name
    (",Ben", 2, ("Person 1", "Ben")),
    (",", 2, ("Person 1", "Person 2")),
    ('"Smith, Ada", Ben', 2, ("Smith, Ada", "Ben")),  # quoted, as in CSV: the comma is the name's
    (' "Smith, Ada" , "Ben ""B"" Ng"', 2, ("Smith, Ada", 'Ben "B" Ng')),
    ('O"Neil, Ben', 2, ('O"Neil', "Ben")),  # a quote inside a name is a character
    ("Ada\nBen", 2, ("Ada", "Ben")),  # one per line, as a text box may send them
])
def test_names_split_like_csv_and_stray_commas_add_no_person(names: str, people: int, expected: tuple) -> None:
    photo = b"not decoded until the engine runs"
    request = Request(mode="group", people=[[photo]] * people, names=names, prompt="x")
    assert request.person_names == expected


def test_names_refusals_say_what_to_do() -> None:
    from instantid.errors import InvalidParameter, UserError

    photo = b"x"
    with pytest.raises(InvalidParameter, match="a quote is not closed"):
        Request(mode="group", people=[[photo]] * 2, names='"Smith, Ada, Ben', prompt="x")
    # A name past the photos is a person without a photo, not a stray comma.
    with pytest.raises(UserError, match=r"No photo of Cy \(person 3\): names lists 3 people for 2 with photos"):
        Request(mode="group", people=[[photo]] * 2, names="Ada, Ben, Cy", prompt="x")
    with pytest.raises(UserError, match=r"No photo of Ben \(person 2\)"):
        Request(mode="group", people=[[photo]], names="Ada, Ben,", prompt="x")
