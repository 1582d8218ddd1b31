"""Data errors that name where they happened, and the count of rows skipped because of them."""

from __future__ import annotations

from dataclasses import dataclass, field

# Row 0 means "the file as a whole": rows themselves are numbered from 1.
FILE_ROW = 0


class DataError(ValueError):
    """One problem with the training data, located to a file, row and field.

    ``str(err) == f"{file}:{row}: {field}: {problem}"``. ``row`` is the 1-based line number for
    JSON Lines and the 1-based record index otherwise; 0 means the whole file. ``reason`` is a short
    slug used to count skips (``empty_completion``, ``identical`` ...). A ``fatal`` error concerns
    the file or the set-up, not one row, so ``on_bad_row=skip`` cannot skip it.
    """

    def __init__(self, file: str, row: int, field: str, problem: str, *, reason: str, fatal: bool = False):
        super().__init__(f"{file}:{row}: {field}: {problem}")
        self.file = file
        self.row = row
        self.field = field
        self.problem = problem
        self.reason = reason
        self.fatal = fatal

    def __reduce__(self):  # picklable across processes (Ray ships exceptions between workers)
        return (_rebuild, (self.file, self.row, self.field, self.problem, self.reason, self.fatal))


def _rebuild(file, row, field, problem, reason, fatal):
    return DataError(file, row, field, problem, reason=reason, fatal=fatal)


@dataclass
class SkipReport:
    """What loading kept and skipped. ``examples`` holds the first few skipped rows' errors."""

    rows: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    MAX_EXAMPLES = 5

    def skip(self, err: DataError) -> None:
        self.skipped[err.reason] = self.skipped.get(err.reason, 0) + 1
        if len(self.examples) < self.MAX_EXAMPLES:
            self.examples.append(str(err))

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def merge(self, other: SkipReport) -> SkipReport:
        merged = SkipReport(self.rows + other.rows, self.kept + other.kept, dict(self.skipped))
        for reason, n in other.skipped.items():
            merged.skipped[reason] = merged.skipped.get(reason, 0) + n
        merged.examples = (self.examples + other.examples)[: self.MAX_EXAMPLES]
        return merged
