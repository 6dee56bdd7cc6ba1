DROP TABLE far_admin_audit;
DROP TABLE far_credits;
DROP INDEX far_reservations_key_created_idx;
ALTER TABLE far_reservations DROP COLUMN rate_window;
DROP TABLE far_rate_counters;
ALTER TABLE far_api_keys DROP COLUMN monthly_budget;
ALTER TABLE far_api_keys DROP COLUMN tokens_per_minute;
ALTER TABLE far_api_keys DROP COLUMN requests_per_minute;
