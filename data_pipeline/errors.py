"""The one error type of the data pipeline: one line naming file, row, column and value."""


class PanelError(ValueError):
  """Invalid panel or titles input. ``str()`` is a single line: file, row, column, value, problem."""

  def __init__(self, file, problem: str, row: int | None = None, column: str | None = None,
               value=None, has_value: bool = False):
    parts = [str(file)]
    if row is not None:
      parts.append(f"row {row}")
    if column is not None:
      parts.append(f"column '{column}'")
    where = ", ".join(parts)
    shown = f" (value {value!r})" if has_value else ""
    super().__init__(f"{where}: {problem}{shown}".replace("\n", " "))
    self.file, self.row, self.column, self.value = file, row, column, value
