"""What a build costs: the dated price table, the plan's token estimate, and the tokens a build counted."""
