-- At the tail of the batch work the scheduler cuts chunks into smaller pieces as it dispatches
-- them, so that every upload slot finishes at about the same time. A piece is a chunk row of its
-- own over a range of lines of the same object: lines [first_line, first_line + recipients).
ALTER TABLE chunks ADD COLUMN first_line INTEGER NOT NULL DEFAULT 0;
