# Generates the SQL script of workload "sqlite3" of suite alloc, run as
# `sqlite3 -batch :memory: < script.sql`: a table with an index, ROWS single
# INSERT statements in one transaction (each one parsed, planned and run:
# many short-lived allocations), ROWS/20 indexed range queries, then
# aggregates, an UPDATE, a GROUP BY over every row and a DELETE. The script
# is deterministic (fixed random seed), and so is its output.
#
#   python3 alloc_sqlite.py ROWS > script.sql
import random
import sys


def main():
    rows = int(sys.argv[1])
    rng = random.Random(1)
    out = sys.stdout
    out.write("CREATE TABLE item(id INTEGER PRIMARY KEY, name TEXT, category TEXT, price REAL, note TEXT);\n")
    out.write("CREATE INDEX item_category ON item(category, name);\n")
    out.write("BEGIN;\n")
    for i in range(rows):
        out.write("INSERT INTO item(name, category, price, note) VALUES('item-%d', 'cat-%d', %.2f, '%s');\n"
                  % (i * 7919 % 100003, i % 61, rng.random() * 1000, "n" * (i % 50)))
    out.write("COMMIT;\n")
    for i in range(rows // 20):
        low = i * 13 % 1000
        out.write("SELECT count(*), max(name) FROM item WHERE category = 'cat-%d' AND name BETWEEN 'item-%d' AND 'item-%d';\n"
                  % (i % 61, low, low + 5))
    out.write("SELECT category, count(*), round(avg(price), 3), max(name) FROM item GROUP BY category ORDER BY 2 DESC, 1;\n")
    out.write("UPDATE item SET note = upper(note) || name WHERE id % 3 = 0;\n")
    out.write("SELECT count(*), sum(length(note)) FROM item;\n")
    out.write("SELECT name, count(*) FROM item GROUP BY name ORDER BY 2 DESC, 1 LIMIT 10;\n")
    out.write("DELETE FROM item WHERE price < 500;\n")
    out.write("SELECT count(*) FROM item;\n")


if __name__ == "__main__":
    main()
