"""racelab pytest plugin (fixtures and options); see issue 6."""
