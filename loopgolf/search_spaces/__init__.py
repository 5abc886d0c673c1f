"""What Optuna may propose (spaces.py), and what fits the byte budget (budget.py)."""
