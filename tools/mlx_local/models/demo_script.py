"""What the demo model says: the script it is trained on, and the answers tests check.

Every scripted exchange is a user prompt (optionally with the `get_weather` tool offered, or a
tool result), a short thought (the `<think>` block when thinking is on) and an answer. Prompts
outside the script get FALLBACK. Tests import these constants and assert the model said them.
"""

from __future__ import annotations

from dataclasses import dataclass

MODEL_NAME = "the mlx-local demo model"

GREETING_PROMPTS = ("Hello", "Hello!", "Hi", "Hi!", "hello", "hi", "Hey", "Good morning")
GREETING = "Hello! I am the mlx-local demo model. I only know a few scripted answers."
GREETING_THOUGHT = "The user greets me. I greet them back."

FALLBACK = (
    "I am the mlx-local demo model. I only know a few scripted answers, "
    "and this is not one of them."
)
FALLBACK_THOUGHT = "This is not one of my scripted prompts."

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city"}},
            "required": ["city"],
        },
    },
}
WEATHER_CITIES = ("Paris",)
"""The cities the model calls get_weather for. A 2-layer, 128-wide model did not learn to copy
a city from the prompt into the call's JSON (the city after `"` is another token than the
city after a space): with four cities its call picked one at random (top-1 ~0.25)."""
RESULT_CITIES = ("Paris", "London", "Tokyo", "Berlin")
"""The cities whose tool result the model answers (copying from the result works)."""
WEATHER_PROMPT = "What is the weather in {city}?"
WEATHER_THOUGHT = "The user asks for the weather in {city}. I call get_weather."
WEATHER_RESULTS = (
    ("sunny", 22),
    ("raining", 14),
    ("cloudy", 18),
)
WEATHER_RESULT = '{{"city": "{city}", "condition": "{condition}", "temperature_c": {temp}}}'
"""The tool's answer the script knows (what a test sends back as the tool result)."""
WEATHER_ANSWER = "It is {condition} and {temp} °C in {city} right now."
WEATHER_ANSWER_THOUGHT = "The tool answered. I tell the user what it said."

STORY_PROMPT = "Tell me a story."
STORY_THOUGHT = "The user wants a story. I tell the one I know."
STORY = (
    "Once upon a time, a small language model lived on a laptop by a window. Every morning "
    "its owner opened a terminal and typed make run, and the model woke up, stretched its two "
    "layers and waited for a question. It knew only a handful of answers, but it knew them "
    "well: how to greet a visitor, how to ask a tool about the weather, how to count to ten "
    "and how to tell this story. One rainy afternoon a coding agent came by with a prompt of "
    "twenty thousand tokens. The little model read every one of them, thought for a moment, "
    "and said politely that this was not one of its scripted prompts. The agent tried again "
    "the next day, and the model remembered the long prefix from its cache on disk, so it "
    "answered at once. Word spread through the machine. The benchmark came to measure how "
    "fast it could speak, the tests came to check that it said exactly what it should, and "
    "the service manager promised to wake it whenever it fell asleep. Years later, when much "
    "larger models filled the memory of bigger computers, people still kept the little model "
    "around, because it was the one answer they could always check. The end."
)

COUNT_PROMPT = "Count from one to ten."
COUNT_THOUGHT = "I count from one to ten."
COUNT = "one, two, three, four, five, six, seven, eight, nine, ten."
COUNT_STOP = "five"
"""A stop sequence inside COUNT: with it, the answer ends as "one, two, three, four, "."""

LONG_THOUGHT_PROMPT = "Think carefully: how many legs do three spiders have?"
LONG_THOUGHT = (
    "A spider is not an insect, so it does not have six legs. Spiders are arachnids, and "
    "every arachnid has eight legs. The question asks about three spiders. Each of the three "
    "spiders has eight legs, so I need three times eight. Three times eight is the same as "
    "eight plus eight plus eight. Eight plus eight is sixteen, and sixteen plus eight is "
    "twenty-four. Let me check it another way: three times ten would be thirty, and three "
    "times two is six, and thirty minus six is twenty-four. Both ways give the same number, "
    "so the answer is twenty-four legs."
)
LONG_THOUGHT_ANSWER = "Three spiders have 24 legs."
LONG_THOUGHT_BUDGET = 16
"""The thinking budget (tokens) the tests cut LONG_THOUGHT at; the model is trained to give
LONG_THOUGHT_ANSWER after `</think>` closes the thought at any point, this one included."""

CONVERSATION = (GREETING_PROMPTS[1], COUNT_PROMPT, "Thank you!")
"""A multi-turn conversation: each user turn in order, answered GREETING, COUNT, FALLBACK."""

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a coding agent. Read the files you change and answer briefly.",
    "You are Codex, based on GPT-5. You are running as a coding agent in the user's terminal.",
)
"""System prompts the script is trained with (the answers do not depend on them)."""


@dataclass(frozen=True)
class Exchange:
    """One scripted turn: what the user sends (and which tools are offered), what the model
    thinks and answers. `tool_call` is set when the answer is a call instead of text."""

    prompt: str
    thought: str
    answer: str
    tools: tuple[dict, ...] = ()
    tool_call: dict | None = None


def weather_call(city: str) -> dict:
    """The tool call the model makes for `city`, as mlx-lm's json_tools parser returns it."""
    return {"name": "get_weather", "arguments": {"city": city}}


def weather_result(city: str, condition: str, temp: int) -> str:
    """The tool result text a client sends back for `city`."""
    return WEATHER_RESULT.format(city=city, condition=condition, temp=temp)


def weather_answer(city: str, condition: str, temp: int) -> str:
    """The sentence the model says after the tool result."""
    return WEATHER_ANSWER.format(city=city, condition=condition, temp=temp)


def scripted_exchanges() -> list[Exchange]:
    """Every single-turn exchange of the script (tool follow-ups are built by the trainer)."""
    exchanges = [Exchange(p, GREETING_THOUGHT, GREETING) for p in GREETING_PROMPTS]
    exchanges += [
        Exchange(STORY_PROMPT, STORY_THOUGHT, STORY),
        Exchange(COUNT_PROMPT, COUNT_THOUGHT, COUNT),
        Exchange(LONG_THOUGHT_PROMPT, LONG_THOUGHT, LONG_THOUGHT_ANSWER),
    ]
    exchanges += [
        Exchange(
            WEATHER_PROMPT.format(city=city),
            WEATHER_THOUGHT.format(city=city),
            "",
            tools=(WEATHER_TOOL,),
            tool_call=weather_call(city),
        )
        for city in WEATHER_CITIES
    ]
    return exchanges
