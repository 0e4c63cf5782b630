"""The Flask front end (web form and JSON API): arrives with the job-service milestone."""
