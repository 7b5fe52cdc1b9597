"""The study's verifiable task: arithmetic problems with exact integer answers.

A problem is a short expression of two or three operands joined by + and * ("What is 37 + 8 * 6?");
the reward is 1 when the last number of the completion equals the answer and 0 otherwise. The reward
reads the expression back from the prompt, so it needs no side table and scores any prompt written by
`Problem.prompt`, templated or not. Worked answers (every product, then the sum) are the SFT targets.
"""
from __future__ import annotations

import ast
import random
import re
from dataclasses import dataclass
from typing import Sequence

from .errors import SubnetscopeError

QUESTION = re.compile(r"What is ([0-9+*\- ]+)\?")
NUMBER = re.compile(r"-?\d[\d,]*")
OPERATORS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b}


@dataclass(frozen=True)
class Difficulty:
    """How hard the generated problems are."""

    # operands per problem, drawn uniformly from this range (inclusive)
    min_operands: int = 2
    max_operands: int = 3
    # operands are integers in [2, max_value]
    max_value: int = 20
    # share of operators that are * (the rest are +)
    product_share: float = 0.5

    def validate(self) -> None:
        if not 2 <= self.min_operands <= self.max_operands:
            raise SubnetscopeError("arithmetic: operands must satisfy 2 <= min_operands <= max_operands")
        if self.max_value < 2 or not 0.0 <= self.product_share <= 1.0:
            raise SubnetscopeError("arithmetic: max_value must be at least 2 and product_share in [0, 1]")

    def distinct_problems(self) -> int:
        """How many different problems this difficulty can draw: (max_value - 1) choices per operand and, where
        both operators occur, 2 per operator, summed over the operand counts."""
        operators = 2 if 0.0 < self.product_share < 1.0 else 1
        return sum((self.max_value - 1) ** k * operators ** (k - 1)
                   for k in range(self.min_operands, self.max_operands + 1))


@dataclass(frozen=True)
class Problem:
    expression: str

    @property
    def answer(self) -> int:
        return evaluate(self.expression)

    @property
    def prompt(self) -> str:
        return f"What is {self.expression}? Give the final answer as a number."

    @property
    def worked_answer(self) -> str:
        """Each product first, then the sum: the reference completion SFT learns from."""
        terms = [t.strip() for t in self.expression.split("+")]
        steps = []
        if any("*" in t for t in terms) and len(terms) > 1:
            steps.append(" + ".join(str(evaluate(t)) for t in terms))
        return " = ".join([self.expression, *steps, str(self.answer)]) + f". The answer is {self.answer}."


def evaluate(expression: str) -> int:
    """The value of an expression of integers, +, - and *, with the usual precedence; anything else
    is refused (the expression comes from a prompt, so eval() is out of the question)."""
    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
            return OPERATORS[type(node.op)](value(node.left), value(node.right))
        raise ValueError(f"not an arithmetic expression: {expression!r}")

    return value(ast.parse(expression, mode="eval").body)


def make_problems(n: int, seed: int, difficulty: Difficulty = Difficulty()) -> list[Problem]:
    """`n` distinct problems drawn with `seed` (fewer only when the difficulty has fewer)."""
    difficulty.validate()
    rng = random.Random(seed)
    seen: dict[str, Problem] = {}
    for _ in range(n * 50):
        if len(seen) == n:
            break
        k = rng.randint(difficulty.min_operands, difficulty.max_operands)
        operands = [str(rng.randint(2, difficulty.max_value)) for _ in range(k)]
        ops = ["*" if rng.random() < difficulty.product_share else "+" for _ in range(k - 1)]
        expression = operands[0] + "".join(f" {o} {v}" for o, v in zip(ops, operands[1:]))
        seen.setdefault(expression, Problem(expression))
    return list(seen.values())


def final_number(text: str) -> int | None:
    """The last integer written in `text` (thousands commas allowed), or None."""
    found = NUMBER.findall(text)
    if not found:
        return None
    try:
        return int(found[-1].replace(",", "").rstrip(","))
    except ValueError:
        return None


def problem_in(prompt: str) -> Problem | None:
    match = QUESTION.search(prompt)
    if match is None:
        return None
    try:
        Problem(match.group(1).strip()).answer
    except (ValueError, SyntaxError):
        return None
    return Problem(match.group(1).strip())


class ArithmeticReward:
    """1.0 when the completion's last number is the answer of the prompt's problem, else 0.0; None
    (skipped) for a prompt without a problem."""

    name = "arithmetic"

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 completion_ids: Sequence[Sequence[int]] | None = None, **kwargs: object) -> list[float | None]:
        scores: list[float | None] = []
        for prompt, completion in zip(prompts, completions):
            problem = problem_in(prompt)
            scores.append(None if problem is None else float(final_number(completion) == problem.answer))
        return scores
