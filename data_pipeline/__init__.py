"""Career data: survey panels -> validated person-year records -> resume text -> tokens."""
